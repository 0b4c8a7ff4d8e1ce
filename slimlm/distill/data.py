"""Training data for distillation: text windows, prompt/completion pairs, and a sparse teacher cache.

- Off-policy KD reads random windows of the *calibration* split of a text source (never the
  evaluation split), drawn once from a seed so a resumed run sees the same batches.
- Sequence-level / black-box KD (Kim & Rush 2016) trains on teacher *text*: a JSONL file of
  ``{"prompt": …, "completion": …}`` rows, written by :func:`fetch_completions` from an
  OpenAI-compatible endpoint (called only when the user passes its URL) or by any other tool.
- The top-k cache stores, per token, the teacher's k largest log-probabilities and their ids
  (fp16 + int32); :func:`dense_from_topk` spreads the remaining mass uniformly over the rest of the
  vocabulary so that every divergence sees a proper distribution.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slimlm.data import encode, load_text
from slimlm.errors import SlimlmError


def text_windows(tokenizer: Any, source: str, seq_len: int, n: int, seed: int, bos_id: int | None = None) -> torch.Tensor:
    """(n, seq_len) token windows at seeded random offsets of ``source``'s calibration split.

    Only a slice of characters around each offset is tokenized (its first, possibly cut, token is
    dropped), so drawing a few windows from a multi-MB text costs milliseconds, not a full encode.
    """
    text = load_text(source, "calib")
    body = seq_len - (1 if bos_id is not None else 0)
    span = 8 * body + 64  # characters: comfortably more than `body` tokens of natural text
    gen = torch.Generator().manual_seed(seed)
    if len(text) > 4 * span:
        starts = torch.randint(0, len(text) - span, (n,), generator=gen).tolist()
        rows = [p for p in (encode(tokenizer, text[s : s + span])[1 : body + 1] for s in starts) if len(p) == body]
        if len(rows) == n:
            return _with_bos(torch.stack(rows), bos_id)  # (n, seq_len)
    return _windows_from_ids(encode(tokenizer, text), source, seq_len, n, gen, bos_id)  # short text or very long tokens


def _windows_from_ids(ids: torch.Tensor, source: str, seq_len: int, n: int, gen: torch.Generator, bos_id: int | None) -> torch.Tensor:
    body = seq_len - (1 if bos_id is not None else 0)
    if len(ids) <= body:
        raise SlimlmError(f"training text {source!r} has {len(ids)} tokens, not enough for one {seq_len}-token window",
                          "pass a longer text (--data) or a smaller --seq-len")
    starts = torch.randint(0, len(ids) - body, (n,), generator=gen)
    return _with_bos(torch.stack([ids[s : s + body] for s in starts.tolist()]), bos_id)


def _with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    if bos_id is None:
        return rows
    return torch.cat([torch.full((len(rows), 1), bos_id), rows], dim=1)


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """Rows ``{"prompt", "completion"}`` of a JSONL file; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"sequence-level data {p} not found", "pass a JSONL file with one {\"prompt\", \"completion\"} object per line")
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise SlimlmError(f"{p}:{i + 1} is not valid JSON", "write one JSON object per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("completion"), str):
            raise SlimlmError(f"{p}:{i + 1} has no string \"completion\"", "each line needs {\"prompt\": …, \"completion\": …}")
        rows.append({"prompt": str(row.get("prompt", "")), "completion": row["completion"]})
    if not rows:
        raise SlimlmError(f"{p} holds no prompt/completion rows", "generate teacher completions first (see docs/distillation.md)")
    return rows


def pair_batch(tokenizer: Any, pairs: list[dict[str, str]], seq_len: int, bos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and a mask (B, L) that is true on completion tokens only."""
    ids, masks = [], []
    for row in pairs:
        prompt = encode(tokenizer, row["prompt"]) if row["prompt"] else torch.zeros(0, dtype=torch.long)
        done = encode(tokenizer, row["completion"])
        if bos_id is not None:
            prompt = torch.cat([torch.tensor([bos_id]), prompt])
        seq = torch.cat([prompt, done])[:seq_len]
        mask = torch.cat([torch.zeros(len(prompt), dtype=torch.bool), torch.ones(len(done), dtype=torch.bool)])[:seq_len]
        ids.append(seq)
        masks.append(mask)
    width = max(len(s) for s in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    out = torch.full((len(ids), width), pad, dtype=torch.long)
    out_mask = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(ids, masks)):
        out[i, : len(s)] = s
        out_mask[i, : len(m)] = m
    return out, out_mask


def fetch_completions(url: str, prompts: list[str], out: str | Path, *, model: str = "default", max_tokens: int = 128,
                      api_key: str | None = None, timeout: float = 120.0) -> Path:
    """Ask an OpenAI-compatible ``/v1/completions`` endpoint for each prompt; write the JSONL pairs.

    This is the only network access in slimlm and it happens only when the user passes ``url``.
    """
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/completions") else "/v1/completions")
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    lines = []
    for prompt in prompts:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(endpoint, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                text = json.loads(resp.read())["choices"][0]["text"]
        except Exception as exc:  # network, HTTP and schema errors all mean the same to the user
            raise SlimlmError(f"teacher endpoint {endpoint} failed: {exc}", "check the URL, the model name and the API key") from None
        lines.append(json.dumps({"prompt": prompt, "completion": text}))
    path = Path(out)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- sparse teacher cache

def topk_log_probs(teacher_logp: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities (B, T, k) fp16 and their token ids (B, T, k) int32."""
    vals, idx = teacher_logp.topk(k, dim=-1)
    return vals.to(torch.float16), idx.to(torch.int32)


def dense_from_topk(vals: torch.Tensor, idx: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T, V) log-probabilities: the cached top-k, the leftover mass spread over the other V − k ids."""
    v = vals.float()
    rest = (1.0 - v.exp().sum(-1, keepdim=True)).clamp(min=1e-8) / max(vocab - v.shape[-1], 1)  # (B, T, 1)
    out = rest.log().expand(*v.shape[:-1], vocab).clone()
    out.scatter_(-1, idx.long(), v)
    return out


class TopKCache:
    """Teacher top-k log-probabilities for a fixed list of windows, in one safetensors file per batch.

    The folder's ``key.json`` identifies teacher, data and k; a mismatch is an error rather than a
    silent reuse of another run's teacher.
    """

    def __init__(self, folder: str | Path, key: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = key
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if key_file.is_file():
            if json.loads(key_file.read_text()) != key:
                raise SlimlmError(f"teacher cache {self.folder} belongs to another teacher, data set or k",
                                  "use a fresh cache folder or delete this one")
        else:
            key_file.write_text(json.dumps(key, indent=1))

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:07d}.safetensors"

    def get(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        p = self._path(index)
        if not p.is_file():
            return None
        t = load_file(str(p))
        return t["vals"], t["idx"]

    def put(self, index: int, vals: torch.Tensor, idx: torch.Tensor) -> None:
        tmp = self._path(index).with_suffix(".tmp")
        save_file({"vals": vals.contiguous().cpu(), "idx": idx.contiguous().cpu()}, str(tmp))
        tmp.replace(self._path(index))


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:16]

