"""Command line: the pictures of methods run on the toy model's first validation image(s).

```bash
python -m vlmfix.viz --methods gift vhr pai --out pictures/toy_row0.png
```
"""

from __future__ import annotations

import argparse
import sys

from PIL import Image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmfix.viz", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["gift", "vhr", "pai"],
                        help="registered method names, run together with their defaults (default: gift vhr pai; "
                             "VAR needs sink dimensions, which the toy has none of)")
    parser.add_argument("--images", type=int, default=1, help="validation images, one batch row each (default 1)")
    parser.add_argument("--row", type=int, default=0, help="the batch row to draw (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="caption length (default 24)")
    parser.add_argument("--full", action="store_true", help="the full toy build (default: the fast one)")
    parser.add_argument("--prompt", default=None, help="the question (default: the toy's caption prompt)")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
    parser.add_argument("--out", required=True, help="the picture file (.png, .svg or .pdf)")
    args = parser.parse_args(argv)

    import vlmfix
    from vlmfix.toy import build_toy, load_example

    extra = {"text": args.prompt} if args.prompt else {}
    model, processor, inputs = load_example(fast=not args.full, images=args.images, **extra)
    files = sorted((build_toy(fast=not args.full, progress=False).data_dir / "images" / "val").glob("*.png"))
    picture = Image.open(files[args.row]).convert("RGB") if args.row < len(files) else None
    with vlmfix.apply(model, *args.methods, tokenizer=processor, record=True) as session:
        out = session.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    caption = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[args.row]
    figure = session.plot(row=args.row, images=[picture] if picture is not None else None)
    figure.suptitle(f"{', '.join(args.methods)} · row {args.row}: {caption.strip()}", fontsize=9)
    print(f"wrote {figure.save(args.out, dpi=args.dpi)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
