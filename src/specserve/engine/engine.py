"""The engine loop: admit requests, run one flattened forward per step, sample, stream.

Each step runs every active sequence together: prompt chunks of sequences still in
prefill (chunked by a token budget) and one token for each decoding sequence.
"""

from __future__ import annotations

import itertools
import time
from collections import deque

import torch

from specserve.cache.kv_cache import KVCache
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.engine.sequence import Sequence, Status, TokenLogprob
from specserve.sampling.logits import SamplingTensors, build_token_counts, build_token_mask, process_batch
from specserve.sampling.params import SamplingParams
from specserve.sampling.sampler import compute_logprobs, sample


def needs_processing(params: SamplingParams) -> bool:
    """False when the row is plain argmax (greedy without penalties)."""
    return not params.greedy or params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def processed_logits(
    logits: torch.Tensor,  # [R, V] fp32
    params: list[SamplingParams],  # one per row
    outputs: list[list[int]],  # generated tokens before each row
    prompts: list[list[int]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(penalised logits `[R, V]`, probs `[R, V]` or None when every row is plain argmax)."""
    if not any(needs_processing(p) for p in params):
        return logits, None
    vocab = logits.shape[-1]
    counts = build_token_counts(outputs, vocab, logits.device) if any(outputs) else None
    prompt_mask = (
        build_token_mask(prompts, vocab, logits.device) if any(p.repetition_penalty != 1.0 for p in params) else None
    )
    result = process_batch(logits, SamplingTensors.from_params(params, logits.device), counts, prompt_mask)
    return result.logits, result.probs


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        max_num_batched_tokens: int = 512,
    ) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be > 0, got {max_num_batched_tokens}")
        self.runner = runner
        self.cache: KVCache = runner.cache
        self.tokenizer = tokenizer
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_ids = frozenset(tokenizer.eos_token_ids) if tokenizer is not None else frozenset()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt_ids) >= self.cache.max_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; the context limit (max_model_len) is {self.cache.max_len}"
            )
        vocab = self.runner.model.config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seq = Sequence(request_id, prompt_ids, params, self.tokenizer, self.runner.device)
        self.requests[request_id] = seq
        self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        seq = self.requests.get(request_id)
        if seq is not None and not seq.finished:
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ the step

    def _admit(self) -> None:
        while self.waiting and self.cache.num_free:
            seq = self.waiting.popleft()
            seq.slot = self.cache.allocate()
            seq.status = Status.PREFILL
            seq.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(seq)

    def step(self) -> list[Sequence]:
        """Run one forward over the active batch; returns the sequences that progressed."""
        self._admit()
        if not self.running:
            return []
        items: list[ForwardItem] = []
        sampled: list[Sequence] = []  # sequences that get a token from this forward
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.status is Status.DECODE:
                items.append(ForwardItem(seq.slot, seq.num_cached, [seq.all_ids[-1]]))
                sampled.append(seq)
                budget -= 1
        for seq in self.running:
            if seq.status is Status.PREFILL and budget > 0:
                chunk = seq.prompt_ids[seq.num_cached : seq.num_cached + budget]
                done = seq.num_cached + len(chunk) == len(seq.prompt_ids)
                items.append(ForwardItem(seq.slot, seq.num_cached, chunk, logits_from=-1 if done else None))
                budget -= len(chunk)
                if done:
                    sampled.append(seq)
        logits, _ = self.runner.forward(items)
        progressed: list[Sequence] = []
        slot_to_seq = {seq.slot: seq for seq in self.running}
        for item in items:
            seq = slot_to_seq[item.slot]
            seq.num_cached += len(item.token_ids)
            self.cache.commit(seq.slot, seq.num_cached)
        tokens = self._sample(sampled, logits)
        now = time.perf_counter()
        for seq, token in zip(sampled, tokens):
            if seq.status is Status.PREFILL:
                seq.status = Status.DECODE
                seq.metrics.first_token_time = now
            seq.metrics.forward_passes += 1
            self.append_tokens(seq, [token])
            progressed.append(seq)
        return progressed

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its row of `logits` `[len(seqs), V]`."""
        params = [s.params for s in seqs]
        penalised, probs = processed_logits(logits, params, [s.output_ids for s in seqs], [s.prompt_ids for s in seqs])
        if probs is None:
            tokens = penalised.argmax(dim=-1)
        else:
            tokens = sample(probs, [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            k = max(seqs[i].params.logprobs for i in want)
            rows = torch.tensor(want, dtype=torch.long)
            lp = compute_logprobs(penalised[rows], tokens[rows], k)
            for j, i in enumerate(want):
                kk = seqs[i].params.logprobs
                top = list(zip(lp.top_token_ids[j, :kk].tolist(), lp.top_logprobs[j, :kk].tolist()))
                seqs[i].pending_logprobs = [TokenLogprob(int(tokens[i]), float(lp.token_logprobs[j]), top)]
        return tokens.tolist()

    # ------------------------------------------------------------------ output handling

    def append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None = None) -> int:
        """Append tokens one at a time, stopping exactly where plain decoding would.

        Returns how many of `tokens` were kept (the rest follow a stop condition).
        """
        params = seq.params
        pending = getattr(seq, "pending_logprobs", None)
        if logprobs is None and pending is not None:
            logprobs, seq.pending_logprobs = pending, None
        kept = 0
        for i, token in enumerate(tokens):
            seq.output_ids.append(token)
            seq.metrics.generated_tokens += 1
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
            kept += 1
            reason = None
            if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
                reason = "stop"
            if seq.detokenizer is not None:
                result = seq.stops.push(seq.detokenizer.add([token]))
                seq.pending_delta += result.text_to_emit
                seq.text += result.text_to_emit
                if result.stopped:
                    reason = "stop"
            if reason is None and len(seq.output_ids) >= params.max_tokens:
                reason = "length"
            if reason is None and seq.num_tokens >= self.cache.max_len:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason)
                break
        return kept

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.detokenizer is not None and reason != "abort" and not seq.stops.stopped:
            tail = seq.stops.push(seq.detokenizer.flush()).text_to_emit + seq.stops.flush()
            seq.pending_delta += tail
            seq.text += tail
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        seq.metrics.finish_time = time.perf_counter()
        if seq.slot is not None:
            self.cache.free(seq.slot)
            seq.slot = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
