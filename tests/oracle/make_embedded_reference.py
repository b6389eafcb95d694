#!/usr/bin/env python3
"""Reference outputs of the embedded Shakespeare model (dsjax/data/shakespeare-v3-tiny) from transformers.

The shipped checkpoint is loaded with `DeepseekV3ForCausalLM.from_pretrained` in float32 (eager attention and
experts), fed two passages of a held-out play tokenized with the shipped tokenizer.json, and its logits, its
routers' selected experts and a greedy continuation are written to tests/data/oracle_embedded/reference.npz
(tests/test_embedded_vs_hf.py compares dsjax against them without torch). The installed transformers is checked
for DeepSeek's routing semantics first (make_reference.check_installed_transformers).

    /tmp/oracle311/bin/python tests/oracle/make_embedded_reference.py
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer
from transformers import DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference import RouterRecorder, check_installed_transformers, save_npz  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CKPT = REPO / "dsjax" / "data" / "shakespeare-v3-tiny"
OUT = REPO / "tests" / "data" / "oracle_embedded"
# From twelfth_night, one of the held-out plays (public domain text; the shakespeare package's copy).
PASSAGES = [
    "DUKE.\nIf music be the food of love, play on,\nGive me excess of it; that, surfeiting,\n"
    "The appetite may sicken and so die.\nThat strain again;--it had a dying fall:\n"
    "O, it came o'er my ear like the sweet sound\nThat breathes upon a bank of violets,\n",
    "VIOLA.\nWhat country, friends, is this?\n\nCAPTAIN.\nThis is Illyria, lady.\n\nVIOLA.\n"
    "And what should I do in Illyria?\nMy brother he is in Elysium.\nPerchance he is not drown'd:--"
    "What think you, sailors?\n",
]
SEQ = 48
PROMPT = "MALVOLIO.\nMadam, yond young fellow swears he will speak with you."
GREEDY = 24


def main() -> int:
    findings = check_installed_transformers()
    torch.manual_seed(0)
    tok = Tokenizer.from_file(str(CKPT / "tokenizer.json"))
    bos = json.loads((CKPT / "config.json").read_text())["bos_token_id"]
    ids = []
    for p in PASSAGES:
        t = [bos] + tok.encode(p).ids
        assert len(t) >= SEQ, f"passage too short: {len(t)} tokens"
        ids.append(t[:SEQ])
    ids = np.asarray(ids, np.int64)
    model = DeepseekV3ForCausalLM.from_pretrained(CKPT, dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager").eval()
    rec = RouterRecorder(model)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.numpy()
    topk = np.stack([rec.records[i][0][2].reshape(ids.shape[0], SEQ, -1)
                     for i in sorted(rec.records)])                                   # [moe layers, B, T, k]
    rec.remove()
    prompt = [bos] + tok.encode(PROMPT).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)
    greedy = out.sequences[0, len(prompt):].numpy()
    step_logits = torch.stack(out.logits, 1)[0].numpy()
    top2 = np.sort(step_logits, -1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    OUT.mkdir(parents=True, exist_ok=True)
    save_npz(OUT / "reference.npz", dict(input_ids=ids.astype(np.int32), logits=logits.astype(np.float32),
                                         topk_idx=topk.astype(np.int32), prompt_ids=np.asarray([prompt], np.int32),
                                         greedy_ids=greedy[None].astype(np.int32),
                                         greedy_margins=margins.astype(np.float32)))
    meta = dict(checkpoint=str(CKPT.relative_to(REPO)), transformers=transformers.__version__,
                torch=torch.__version__, python=platform.python_version(), passages=PASSAGES, prompt=PROMPT,
                min_greedy_margin=float(margins.min()), findings=findings)
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {OUT}: logits {logits.shape}, greedy {tok.decode(greedy.tolist())!r}, min greedy margin "
          f"{margins.min():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
