"""Export any checkpoint we read as a Hugging Face model directory.

    python -m memoryformer.export checkpoint=PATH out=DIR [tokenizer=PATH] [eos_token=<|endoftext|>]

`checkpoint`: a Lightning .ckpt, a DeepSpeed checkpoint directory, or an exported directory (old or new
format). MemoryFormer models become a remote-code `MemoryFormerForCausalLM` directory (load with
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`), Pythia models a `GPTNeoXForCausalLM`
directory. The tokenizer stored with the checkpoint is copied in unless `tokenizer=` overrides it.
A bad argument prints one sentence on stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

from memoryformer.config import EOS_TOKEN

KEYS = ("checkpoint", "out", "tokenizer", "eos_token")


def parse_args(argv: list[str]) -> dict[str, str]:
    """`key=value` arguments -> dict; raises `ValueError` naming a malformed or unknown one."""
    args: dict[str, str] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"argument {item!r} is not one of {', '.join(k + '=...' for k in KEYS)}.")
        args[key] = value
    for key in ("checkpoint", "out"):
        if not args.get(key):
            raise ValueError(f"{key}= is required: python -m memoryformer.export checkpoint=PATH out=DIR.")
    return args


def export(checkpoint: str, out: str, tokenizer: str | None = None, eos_token: str = EOS_TOKEN) -> Path:
    """Load `checkpoint` with `load_model` and write it to `out` with `export_model`; returns `out`."""
    from memoryformer.checkpoint import CheckpointError, export_model, load_model

    src, dst = Path(checkpoint).expanduser().resolve(), Path(out).expanduser().resolve()
    if src == dst:
        raise CheckpointError(f"out={out} is the checkpoint itself; export to another directory.")
    model, stored_tokenizer = load_model(src)
    return export_model(model, dst, tokenizer or stored_tokenizer, eos_token=eos_token, strict=True)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    from memoryformer.checkpoint import CheckpointError

    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = export(**args)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {args['checkpoint']} to {out}")


if __name__ == "__main__":
    main()
