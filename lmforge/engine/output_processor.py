"""The text side of a completion: incremental detokenization, stop strings, logprobs. Runs after sampling."""

from lmforge.engine.outputs import CompletionOutput, Logprob
from lmforge.engine.sampling_params import SamplingParams
from lmforge.tokenizer import IncrementalDetokenizer, Tokenizer


class CompletionState:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams, index: int):
        self.index = index
        self.params = params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.tokenizer = tokenizer
        self.text = ""
        self.emitted = 0  # characters already handed out as streamed deltas
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None

    def add_token(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> str | None:
        """Appends a token's text; returns the stop string it completed, if any (the text is then cut there)."""
        if self.logprobs is not None and logprob is not None:
            entry = {token: Logprob(logprob, decoded_token=self.tokenizer.decode([token], False))}
            for rank, (tid, lp) in enumerate(top or [], start=1):
                if tid == token:
                    entry[token].rank = rank
                else:
                    entry[tid] = Logprob(lp, rank, self.tokenizer.decode([tid], False))
            self.logprobs.append(entry)
            self.cumulative_logprob += logprob
        return self._append(self.detok.add(token))

    def finish(self, token: int, stop: str | None, eos_token_ids: set[int] | frozenset[int], num_output_tokens: int,
               num_tokens: int, max_model_len: int, refused: bool) -> tuple[str, int | str | None] | None:
        """(finish_reason, stop_reason) when the sequence ends with `token`, just added (`stop`: the stop string
        add_token found), else None. The one place that decides: a stop token, EOS (unless ignore_eos), a stop
        string, max_tokens or max_model_len, a grammar that accepts nothing more (`refused`). Ending flushes the
        text the detokenizer held back, which may itself complete a stop string."""
        params = self.params
        if token in params.stop_token_ids:
            end = "stop", token
        elif token in eos_token_ids and not params.ignore_eos:
            end = "stop", None
        elif stop is not None:
            return "stop", stop  # the text ends at the stop string: nothing held back to flush
        elif num_output_tokens >= params.max_tokens or num_tokens >= max_model_len:
            end = "length", None
        elif refused:
            end = "stop", None
        else:
            return None
        held = self.flush()
        return ("stop", held) if held is not None else end

    def flush(self) -> str | None:
        """At the end of generation: text the detokenizer still held back (an unfinished character)."""
        return self._append(self.detok.finish())

    def _append(self, piece: str) -> str | None:
        if not piece:
            return None
        searched_from = max(0, len(self.text) - self.max_stop + 1)
        self.text += piece
        if not self.max_stop:
            return None
        hits = [(i, s) for s in self.params.stop if (i := self.text.find(s, searched_from)) >= 0]
        if not hits:
            return None
        at, stop = min(hits)
        self.text = self.text[: at + len(stop)] if self.params.include_stop_str_in_output else self.text[:at]
        return stop

    def delta(self, finished: bool) -> str:
        """New text that can no longer turn out to be the start of a stop string."""
        held = 0 if finished or not self.max_stop else self.max_stop - 1
        visible = max(self.emitted, len(self.text) - held)
        piece = self.text[self.emitted: visible]
        self.emitted = visible
        return piece

    def output(self, token_ids: list[int], finish_reason: str | None, stop_reason) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, list(token_ids), self.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs), finish_reason, stop_reason)
