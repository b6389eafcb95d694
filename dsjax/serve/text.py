"""Streaming text filters of the server: stop strings and DeepSeek-R1's `<think>...</think>` split.

Both see text in the pieces the engine emits (one per token) and must find strings that straddle pieces, so each
holds back the longest tail that could still begin a match and releases it once it cannot (or at the end).
"""

from __future__ import annotations


def _partial_tail(text: str, needles: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `needles`."""
    best = 0
    for s in needles:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopFilter:
    """Cuts the text before the first stop string (the stop string itself is not returned, as OpenAI does).

    Example:
        >>> f = StopFilter(["\\n\\n"]); f.push("a\\n"), f.push("\\nb")
        (('a', False), ('', True))
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was found (nothing after it is emitted)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return buf[:min(hits)], True
        keep = _partial_tail(buf, self.stops)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class ReasoningSplitter:
    """Routes text inside `<think>...</think>` to reasoning, the rest to content (DeepSeek-R1's format).

    R1's chat template may end the prompt with `<think>\\n` so that the output starts inside the thought: pass
    `thinking=True` then.

    Example:
        >>> s = ReasoningSplitter(); s.push("<thi"), s.push("nk>hm</think>ok")
        (('', ''), ('hm', 'ok'))
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self.held = ""

    def push(self, text: str) -> tuple[str, str]:
        """(reasoning, content) text safe to emit now."""
        buf, out = self.held + text, {True: [], False: []}
        while True:
            tag = self.CLOSE if self.thinking else self.OPEN
            i = buf.find(tag)
            if i < 0:
                break
            out[self.thinking].append(buf[:i])
            buf = buf[i + len(tag):]
            self.thinking = not self.thinking
        keep = _partial_tail(buf, [self.CLOSE if self.thinking else self.OPEN])
        out[self.thinking].append(buf[:len(buf) - keep])
        self.held = buf[len(buf) - keep:]
        return "".join(out[True]), "".join(out[False])

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        return (held, "") if self.thinking else ("", held)


def prompt_opens_thought(tail: str) -> bool:
    """Whether a rendered prompt ends inside `<think>` (R1's template after 2025-05 adds it to the generation
    prompt): its output then starts as reasoning."""
    tail = tail.rstrip()
    return tail.endswith(ReasoningSplitter.OPEN)
