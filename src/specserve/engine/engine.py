"""The engine loop: admit requests, run one flattened forward per step, sample, stream.

Each step runs every active sequence together: prompt chunks of sequences still in
prefill (chunked by a token budget) and one token for each decoding sequence.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque

import torch

from specserve.cache.kv_cache import KVCache, KVCacheFull
from specserve.engine.runner import ForwardItem, ModelRunner
from specserve.engine.sequence import Sequence, Status, TokenLogprob
from specserve.model.layers import greedy_ids
from specserve.sampling.logits import (
    GREEDY_TEMPERATURE_EPS,
    SamplingTensors,
    build_token_counts,
    build_token_mask,
    process_batch,
)
from specserve.sampling.params import SamplingParams
from specserve.sampling.rng import ACCEPT, TOKEN, position_uniforms
from specserve.sampling.sampler import compute_logprobs, sample
from specserve.sampling.verifier import inverse_cdf, target_distributions, verify
from specserve.spec.base import Drafter, DraftProposal, SequenceView
from specserve.spec.policy import FixedSpecPolicy, SpecPolicy
from specserve.spec.tree import ancestor_mask, draft_levels, walk
from specserve.spec.tree import depths as tree_depths


def _count_positions(counts: list[int], n: int) -> None:
    """counts[j] += 1 for j < n, growing the list as needed."""
    if len(counts) < n:
        counts.extend([0] * (n - len(counts)))
    for j in range(n):
        counts[j] += 1


def _seeded_uniforms(
    seqs: list[Sequence], rows: list[int], device: torch.device, stream: int = TOKEN
) -> torch.Tensor | None:
    """Counter-based uniforms for the rows of seeded sampling sequences (NaN elsewhere).

    Row j of a sequence picks its output position `len(output_ids) + j`, so a seeded
    request's tokens do not depend on the batch or on how many drafts a step verified.
    """
    if not any(s.params.seed is not None and not s.params.greedy for s in seqs):
        return None
    values: list[float] = []
    for seq, n in zip(seqs, rows):
        if seq.params.seed is None or seq.params.greedy:
            values.extend([math.nan] * n)
        else:
            values.extend(position_uniforms(seq.params.seed, stream, len(seq.output_ids), n))
    return torch.tensor(values, dtype=torch.float64, device=device)


def needs_processing(params: SamplingParams) -> bool:
    """False when the row is plain argmax (greedy without penalties)."""
    return not params.greedy or params.has_penalties


def _temperature_only(params: SamplingParams, vocab: int) -> bool:
    """A sampled row whose distribution is softmax(logits / temperature): no penalty, no
    top-k, top-p or min-p."""
    return (
        params.temperature >= GREEDY_TEMPERATURE_EPS and not 0 < params.top_k < vocab and params.top_p >= 1.0
        and params.min_p <= 0.0 and not params.has_penalties
    )


def _walk_tree(tokens: list[int], parents: list[int], targets: list[int]) -> tuple[list[int], list[int]]:
    """(emitted tokens, accepted drafts) of a token tree walked with the target's token
    after every node (`targets[0]` after the root, `targets[j + 1]` after draft j)."""
    path = walk(tokens, parents, targets)
    return [tokens[j] for j in path] + [targets[path[-1] + 1 if path else 0]], path


def _walk_greedy(
    drafts: list[list[int]], parents: list[list[int] | None], top: list[int]
) -> tuple[list[list[int]], list[list[int] | None]]:
    """Greedy verification from every row's argmax token `top` (rows in sequence order, each
    sequence's root row then its drafts'): per sequence the emitted tokens and, for a token
    tree, its accepted drafts. A chain keeps its drafts while they are the target's tokens."""
    emitted: list[list[int]] = []
    paths: list[list[int] | None] = []
    start = 0
    for d, tree in zip(drafts, parents):
        targets = top[start : start + len(d) + 1]
        start += len(d) + 1
        if tree is None:
            n = next((j for j, tok in enumerate(d) if tok != targets[j]), len(d))
            emitted.append(d[:n] + [targets[n]])
            paths.append(None)
        else:
            tokens, path = _walk_tree(d, tree, targets)
            emitted.append(tokens)
            paths.append(path)
    return emitted, paths


def _scoring_rows(start: int, num_emitted: int, path: list[int] | None) -> list[int]:
    """The forward rows whose distributions gave a sequence's emitted tokens: a chain's
    first rows in order, a tree's root row then the rows after its accepted drafts."""
    if path is None:
        return list(range(start, start + num_emitted))
    return [start] + [start + 1 + j for j in path]


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
    if all(_temperature_only(p, vocab) for p in params):
        # what process_batch computes for these rows, without its per-field tensors
        temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
        logits = logits.float()
        return logits, torch.softmax(logits / temperature[:, None], dim=-1)
    repetition = any(p.repetition_penalty != 1.0 for p in params)
    # token counts only where a penalty reads them (a [R, V] scatter a step otherwise)
    penalties = any(p.has_penalties for p in params)
    counts = build_token_counts(outputs, vocab, logits.device) if penalties and any(outputs) else None
    prompt_mask = build_token_mask(prompts, vocab, logits.device) if repetition else None
    result = process_batch(logits, SamplingTensors.from_params(params, logits.device), counts, prompt_mask)
    return result.logits, result.probs


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        tokenizer,
        max_num_batched_tokens: int = 512,
        drafter: Drafter | None = None,
        policy: SpecPolicy | None = None,
    ) -> None:
        if max_num_batched_tokens <= 0:
            raise ValueError(f"max_num_batched_tokens must be > 0, got {max_num_batched_tokens}")
        self.runner = runner
        self.cache: KVCache = runner.cache
        self.tokenizer = tokenizer
        self.max_num_batched_tokens = max_num_batched_tokens
        self.drafter = drafter
        self.policy = policy if policy is not None else FixedSpecPolicy(0)
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

    def stats(self) -> dict[str, float | int]:
        """Load gauges: running and waiting requests, KV cache usage (0..1)."""
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_usage": self.cache.usage(),
        }

    # ------------------------------------------------------------------ the step

    def _admit(self) -> None:
        """Move waiting sequences into the batch while slots and KV blocks allow.

        A sequence's leading blocks are taken from the prefix cache where they match;
        a preempted sequence comes back the same way (often with its own blocks still
        cached). Admission keeps one free block per decoding sequence in reserve, so
        new prompts do not push running sequences into preemption at once.
        """
        cache = self.cache
        while self.waiting and cache.num_free:
            seq = self.waiting[0]
            slot = cache.allocate()
            tokens = seq.all_ids
            matched = cache.match_prefix(slot, tokens)
            first_chunk = min(len(tokens) - matched, self.max_num_batched_tokens)
            reserve = sum(1 for s in self.running if s.status is Status.DECODE)
            if cache.blocks_needed(slot, matched + first_chunk) + reserve > cache.num_free_blocks and self.running:
                cache.free(slot)  # matched blocks go back to the prefix cache
                break
            self.waiting.popleft()
            seq.slot = slot
            seq.num_cached = matched
            seq.status = Status.PREFILL
            seq.metrics.cached_tokens += matched
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.perf_counter()
            self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Take a sequence out of the batch to free its KV blocks (recompute later).

        Its full blocks stay in the prefix cache until the memory is needed, so it
        usually comes back without recomputing much. Its tokens and RNG are kept.
        """
        self.cache.free(seq.slot)
        seq.slot = None
        seq.num_cached = 0
        seq.status = Status.WAITING
        seq.metrics.preemptions += 1
        if self.drafter is not None:
            self.drafter.release(seq.request_id)
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, num_tokens: int, protected: list[Sequence]) -> bool:
        """Blocks for `num_tokens` of `seq`, preempting the newest other sequences if needed.

        False when nothing is left to preempt (the caller shrinks its request).
        """
        while not self.cache.ensure(seq.slot, num_tokens):
            victims = [s for s in reversed(self.running) if s is not seq and s not in protected]
            if not victims:
                return False
            self._preempt(victims[0])
        return True

    def step(self) -> list[Sequence]:
        """Run one forward over the active batch; returns the sequences that progressed.

        Decoding sequences contribute their last token plus the drafter's proposal
        (zero or more tokens each); sequences in prefill (new, or back from preemption)
        contribute a chunk of their tokens.
        """
        step_start = time.perf_counter()
        self._admit()
        if not self.running:
            return []
        decoding = [s for s in self.running if s.status is Status.DECODE]
        budgets = self._draft_budgets(decoding)
        # KV blocks for every decode (oldest first): its token and drafts, else its token
        # alone, else preempt newer sequences
        kept: list[Sequence] = []
        for seq, k in zip(decoding, budgets):
            if seq.slot is None:
                continue  # preempted for an older sequence
            if not self.cache.ensure(seq.slot, seq.num_cached + 1 + k) and not self._make_room(
                seq, seq.num_cached + 1, kept
            ):
                if not kept:
                    raise KVCacheFull("the KV cache cannot hold one sequence")  # capacity >= max_len prevents this
                # older sequences hold the blocks: this one steps out (recompute) and comes back
                self._preempt(seq)
                continue
            kept.append(seq)
        keep = {id(s) for s in kept}
        budgets = [
            min(k, self.cache.capacity(s.slot) - s.num_cached - 1)
            for s, k in zip(decoding, budgets)
            if id(s) in keep
        ]
        decoding = kept
        proposal = self._propose(decoding, budgets)
        drafts = proposal.token_ids
        items: list[ForwardItem] = []
        sampled: list[Sequence] = []  # sequences that get tokens from this forward, in row order
        sampled_drafts: list[list[int]] = []
        sampled_parents: list[list[int] | None] = []
        chunks: list[tuple[Sequence, int]] = []  # prefill chunks that do not finish
        budget = self.max_num_batched_tokens
        for seq, d, parents in zip(decoding, drafts, proposal.parents):
            item = ForwardItem(seq.slot, seq.num_cached, [seq.last_token, *d], logits_from=0)
            if parents is not None:  # a token tree: positions by depth, attention to ancestors
                item.positions = [seq.num_cached + depth for depth in [0, *tree_depths(parents)]]
                item.tree_mask = ancestor_mask(parents, self.runner.device)
            items.append(item)
            sampled.append(seq)
            sampled_drafts.append(d)
            sampled_parents.append(parents)
            budget -= 1 + len(d)
        for seq in self.running:
            if seq.status is not Status.PREFILL or budget <= 0:
                continue
            total = seq.num_tokens
            room = self.cache.capacity(seq.slot) + self.cache.num_free_blocks * self.cache.block_size
            n = min(budget, total - seq.num_cached, room - seq.num_cached)
            if n <= 0 or not self.cache.ensure(seq.slot, seq.num_cached + n):
                continue
            done = seq.num_cached + n == total
            chunk = seq.all_ids[seq.num_cached : seq.num_cached + n]
            items.append(ForwardItem(seq.slot, seq.num_cached, chunk, logits_from=-1 if done else None))
            budget -= n
            if done:
                sampled.append(seq)
                sampled_drafts.append([])
                sampled_parents.append(None)
            else:
                chunks.append((seq, n))
        if not items:
            # every sequence is a prefill waiting for blocks the others hold: let the
            # oldest go on by preempting the newest
            if len(self.running) > 1:
                self._preempt(self.running[-1])
            return []
        t0 = time.perf_counter()
        feeds = self.drafter is not None and getattr(self.drafter, "wants_hidden", False)
        # rows that only take an argmax get their tokens from the head, without logits
        greedy = not any(needs_processing(s.params) or s.params.logprobs is not None for s in sampled)
        layers = getattr(self.drafter, "feature_layers", ()) if feeds else ()
        out, hidden = self.runner.forward(items, all_hidden=feeds, greedy=greedy, feature_layers=layers)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)  # verification waits for it anyway; the policy times it
        forward_time = time.perf_counter() - t0
        row_of = dict(zip((it.slot for it in items), itertools.accumulate((len(it.token_ids) for it in items), initial=0)))
        if greedy:
            emitted, paths = _walk_greedy(sampled_drafts, sampled_parents, out.tolist())
        else:
            draft_probs = proposal.probs + [None] * (len(sampled) - len(decoding))
            emitted, paths = self._verify(sampled, sampled_drafts, draft_probs, out, sampled_parents)
        verify_time = time.perf_counter() - t0
        now = time.perf_counter()
        fed_rows: list[tuple[str, int, list[int]]] = []  # (request, first position, forward rows) for the drafter
        for seq, n in chunks:
            if feeds:
                fed_rows.append((seq.request_id, seq.num_cached, list(range(row_of[seq.slot], row_of[seq.slot] + n))))
            seq.num_cached += n
            self.cache.commit(seq.slot, seq.num_cached, seq.all_ids)
        for seq, d, parents, tokens, path in zip(sampled, sampled_drafts, sampled_parents, emitted, paths):
            n_acc = len(tokens) - 1
            if path is not None:
                # the accepted branch's K/V sit at its drafts' forward indices: move them
                # to the positions after the root before anything reads them
                src = [seq.num_cached + 1 + j for j in path]
                dst = list(range(seq.num_cached + 1, seq.num_cached + 1 + len(path)))
                self.cache.move(seq.slot, src, dst)
            start, base = seq.num_cached, row_of[seq.slot]
            if seq.status is Status.PREFILL:
                fed = range(base, base + seq.num_tokens - seq.num_cached)
                seq.num_cached = seq.num_tokens
                seq.status = Status.DECODE
                if seq.metrics.first_token_time is None:
                    seq.metrics.first_token_time = now
            else:
                fed = [base] + [base + 1 + j for j in (path if path is not None else range(n_acc))]
                seq.num_cached += 1 + n_acc  # the fed token and the accepted drafts; the rest rolls back
                m = seq.metrics
                m.verify_time += verify_time
                m.drafted_tokens += len(d)
                m.accepted_tokens += n_acc
                # per draft position; in a tree, per depth (drafted when some node lies there)
                _count_positions(m.drafted_per_position, draft_levels(d, parents))
                _count_positions(m.accepted_per_position, n_acc)
            # full blocks join the prefix cache, before a finished request frees them: the cached
            # positions hold the sequence's tokens and the accepted drafts (the last token is new)
            self.cache.commit(seq.slot, seq.num_cached, seq.all_ids + tokens[:n_acc])
            seq.metrics.forward_passes += 1
            self.append_tokens(seq, tokens)
            if feeds and not seq.finished:
                fed_rows.append((seq.request_id, start, list(fed)))
        if fed_rows:
            self._feed_hidden(hidden, fed_rows)
        if self.drafter is not None:
            # finished sequences were already released by the drafter and the policy
            levels = [draft_levels(d, p) for d, p in zip(drafts, proposal.parents)]
            live = [(s, n, t, d, c) for s, n, t, d, c in zip(decoding, levels, emitted, drafts, proposal.confidence)
                    if not s.finished]
            if live:
                self.drafter.observe([self._view(s) for s, *_ in live], [len(t) - 1 for _, _, t, _, _ in live])
            for seq, n, tokens, d, conf in live:
                self.policy.update(seq.request_id, n, len(tokens) - 1, conf, len(d))
        self.policy.observe_step(
            len(items), sum(len(it.token_ids) for it in items), time.perf_counter() - step_start,
            forward_seconds=forward_time, drafted=sum(len(d) for d in drafts), decoding=len(decoding),
        )
        return sampled

    def _feed_hidden(self, hidden: torch.Tensor, fed: list[tuple[str, int, list[int]]]) -> None:
        """Hand a feature-reading drafter the target's hidden rows of the tokens just cached:
        per request, its first position and the forward rows of that position and the next
        ones (prefill chunks, accepted drafts). One gather for the whole batch."""
        index = torch.as_tensor([r for _, _, rows in fed for r in rows], dtype=torch.long, device=hidden.device)
        gathered = hidden.index_select(0, index)
        at = 0
        for request_id, start, rows in fed:
            self.drafter.take_hidden(request_id, start, gathered[at : at + len(rows)])
            at += len(rows)

    def _view(self, seq: Sequence) -> SequenceView:
        return SequenceView(seq.request_id, seq.all_ids, len(seq.prompt_ids), seq.params, seq.slot, seq.generator)

    def _draft_budgets(self, decoding: list[Sequence]) -> list[int]:
        """Most draft tokens per decoding sequence this step (the policy's plan, capped)."""
        if self.drafter is None or not decoding:
            return [0] * len(decoding)
        prefill = sum(s.num_tokens - s.num_cached for s in self.running if s.status is Status.PREFILL)
        other = len(decoding) + min(prefill, self.max_num_batched_tokens)
        context = sum(s.num_cached for s in decoding) / len(decoding)
        pending = getattr(self.drafter, "pending_rows", None)  # a drafter's catch-up backlog per sequence
        plan = self.policy.budgets(
            [s.request_id for s in decoding], other, context,
            None if pending is None else [pending(self._view(s)) for s in decoding],
        )
        token_room = self.max_num_batched_tokens - len(decoding)
        budgets = []
        for seq, k in zip(decoding, plan):
            room = min(
                self.cache.max_len - seq.num_tokens - 1,  # KV room for the drafts
                seq.params.max_tokens - len(seq.output_ids) - 1,  # never draft past max_tokens
                token_room,
            )
            k = max(0, min(k, room))
            token_room -= k
            budgets.append(k)
        return budgets

    def _propose(self, decoding: list[Sequence], budgets: list[int]) -> DraftProposal:
        """Draft tokens per decoding sequence (empty chains without a drafter)."""
        if self.drafter is None or not any(budgets):
            return DraftProposal([[] for _ in decoding])
        t0 = time.perf_counter()
        proposal = self.drafter.propose([self._view(s) for s in decoding], budgets)
        draft_time = time.perf_counter() - t0
        self.policy.observe_draft_time(
            draft_time, sum(len(t) for t in proposal.token_ids), catch_up=proposal.catch_up_seconds,
            catch_up_rows=proposal.catch_up_rows,
        )
        for seq in decoding:
            seq.metrics.draft_time += draft_time
        # a prefix of a tree's drafts is a tree: parents come first (confidence may run on)
        return DraftProposal(
            [list(t[:b]) for t, b in zip(proposal.token_ids, budgets)],
            [q[:b] if q is not None else None for q, b in zip(proposal.probs, budgets)],
            [p[:b] if p is not None else None for p, b in zip(proposal.parents, budgets)],
            proposal.confidence,
            proposal.catch_up_seconds,
            proposal.catch_up_rows,
        )

    def _verify(
        self,
        seqs: list[Sequence],
        drafts: list[list[int]],
        draft_probs: list[torch.Tensor | None],  # per sequence [k_i, V], None = one-hot q
        logits: torch.Tensor,  # [sum(k_i + 1), V], row order = seqs
        parents: list[list[int] | None],  # per sequence: None for a chain, else its tree
    ) -> tuple[list[list[int]], list[list[int] | None]]:
        """Emitted tokens per sequence (accepted drafts plus the bonus/recovered token) and,
        for a token tree, the indices of its accepted drafts (None for chains)."""
        if not any(drafts):
            return [[t] for t in self._sample(seqs, logits)], [None] * len(seqs)
        starts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))
        if not any(needs_processing(s.params) for s in seqs):
            # every row plain argmax (logprobs asked): one argmax over all rows and one copy
            # to the host, no distributions
            emitted, paths = _walk_greedy(drafts, parents, greedy_ids(logits).tolist())
            rows_of = [_scoring_rows(starts[i], len(e), paths[i]) for i, e in enumerate(emitted)]
            self._record_logprobs(seqs, emitted, rows_of, logits)
            return emitted, paths
        params = [s.params for s in seqs]
        penalised, probs = target_distributions(
            logits, params, [s.output_ids for s in seqs], [s.prompt_ids for s in seqs], drafts, parents
        )
        emitted: list[list[int]] = [[] for _ in seqs]
        paths: list[list[int] | None] = [None] * len(seqs)
        rows_of: list[list[int]] = [[] for _ in seqs]  # the rows that scored each emitted token
        chains = [i for i, p in enumerate(parents) if p is None]
        if chains:
            sub = [seqs[i] for i in chains]
            chain_rows = [r for i in chains for r in range(starts[i], starts[i + 1])]
            chain_probs = probs if len(chains) == len(seqs) else probs[torch.tensor(chain_rows, device=probs.device)]
            cu = list(itertools.accumulate((len(drafts[i]) for i in chains), initial=0))
            flat = torch.tensor([t for i in chains for t in drafts[i]], dtype=torch.long, device=logits.device)
            result = verify(
                chain_probs, flat, cu, [draft_probs[i] for i in chains], [s.params.greedy for s in sub],
                [s.generator for s in sub],
                _seeded_uniforms(sub, [len(drafts[i]) + 1 for i in chains], logits.device),
                _seeded_uniforms(sub, [len(drafts[i]) + 1 for i in chains], logits.device, ACCEPT),
            )
            for i, tokens in zip(chains, result.emitted):
                emitted[i] = tokens
                rows_of[i] = _scoring_rows(starts[i], len(tokens), None)
        for i, tree in enumerate(parents):
            if tree is not None:
                emitted[i], paths[i] = self._verify_tree(seqs[i], drafts[i], tree, probs[starts[i] : starts[i + 1]])
                rows_of[i] = _scoring_rows(starts[i], len(emitted[i]), paths[i])
        self._record_logprobs(seqs, emitted, rows_of, penalised)
        return emitted, paths

    def _record_logprobs(
        self, seqs: list[Sequence], emitted: list[list[int]], rows_of: list[list[int]], penalised: torch.Tensor
    ) -> None:
        """Logprobs of the emitted tokens (from the rows that scored them) for the sequences
        that asked: one call for all of them, one copy to the host."""
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            dev = penalised.device
            rows = torch.tensor([r for i in want for r in rows_of[i]], dtype=torch.long, device=dev)
            chosen = torch.tensor([t for i in want for t in emitted[i]], dtype=torch.long, device=dev)
            lp = compute_logprobs(penalised[rows], chosen, max(seqs[i].params.logprobs for i in want))
            token_lp, top_ids, top_lp = lp.token_logprobs.tolist(), lp.top_token_ids.tolist(), lp.top_logprobs.tolist()
            j = 0
            for i in want:
                kk = seqs[i].params.logprobs
                seqs[i].pending_logprobs = []
                for tok in emitted[i]:
                    top = list(zip(top_ids[j][:kk], top_lp[j][:kk]))
                    seqs[i].pending_logprobs.append(TokenLogprob(tok, token_lp[j], top))
                    j += 1

    def _verify_tree(
        self, seq: Sequence, tokens: list[int], parents: list[int], probs: torch.Tensor  # [k + 1, V]
    ) -> tuple[list[int], list[int]]:
        """Walk a token tree with the target's own tokens: (emitted tokens, accepted drafts).

        Each node's target token is its argmax (greedy) or its draw with the uniform of the
        output position at that depth, the one plain sampling would use there.
        """
        if seq.params.greedy:
            targets = greedy_ids(probs).tolist()
        else:
            node_depth = [0, *tree_depths(parents)]
            n = max(node_depth) + 1
            u = _seeded_uniforms([seq], [n], probs.device)
            if u is None:
                gen = seq.generator
                u = torch.rand(n, dtype=torch.float64, generator=gen, device=gen.device if gen is not None else "cpu")
            targets = inverse_cdf(probs, u.to(probs.device)[node_depth]).tolist()
        return _walk_tree(tokens, parents, targets)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from its row of `logits` `[len(seqs), V]` (no drafts)."""
        params = [s.params for s in seqs]
        penalised, probs = processed_logits(logits, params, [s.output_ids for s in seqs], [s.prompt_ids for s in seqs])
        if probs is None:
            tokens = greedy_ids(penalised)
        else:
            tokens = sample(probs, [s.generator for s in seqs], uniforms=_seeded_uniforms(seqs, [1] * len(seqs), logits.device))
        chosen = tokens.tolist()
        self._record_logprobs(seqs, [[t] for t in chosen], [[i] for i in range(len(seqs))], penalised)
        return chosen

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
        if self.drafter is not None:
            self.drafter.release(seq.request_id)
        self.policy.release(seq.request_id)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
