"""`python -m vlmfix.integrations.lmms_eval write-tasks`: write lmms-eval task folders scored by vlmfix.eval.

```
write-tasks --out DIR --benchmark pope --toy toy_fast                      # the toy's POPE questions
write-tasks --out DIR --benchmark pope --questions FILE --images DIR       # a POPE question file
write-tasks --out DIR --benchmark amber|mme|hallusionbench --toy toy_fast  # the toy's miniature (vlmfix.toy.bench)
write-tasks --out DIR --benchmark amber|mme|hallusionbench [--data DIR]    # a local release; default: its variable
```

The local releases are those the benchmark app reads, in the same layouts and from the same environment
variables (`conf/data/*.yaml`): VLMFIX_AMBER, VLMFIX_MME, VLMFIX_HALLUSIONBENCH. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmfix.eval import amber, hallusion, mme, pope
from vlmfix.integrations.lmms_tasks import (
    DOCS_FILE,
    toy_miniatures,
    toy_pope_questions,
    write_amber_tasks,
    write_hallusion_task,
    write_mme_task,
    write_pope_task,
)

BENCHMARKS = ("pope", "amber", "mme", "hallusionbench")
DATA = {  # benchmark -> (variable, layout, where users get it): conf/data/*.yaml
    "amber": ("VLMFIX_AMBER", "$VLMFIX_AMBER/data/{annotations.json, relation.json, safe_words.txt, query/"
              "query_*.json} and $VLMFIX_AMBER/image/AMBER_<id>.jpg", amber.SOURCE),
    "mme": ("VLMFIX_MME", "$VLMFIX_MME/{existence,count,position,color}/<image>.jpg + <image>.txt (one MME_Benchmark/ "
            "level is descended), or with --source hf a folder of lmms-lab/MME parquet files", mme.SOURCE),
    "hallusionbench": ("VLMFIX_HALLUSIONBENCH", "$VLMFIX_HALLUSIONBENCH/HallusionBench.json and the unzipped "
                       "hallusion_bench/{VD,VS}/...", hallusion.SOURCE),
}
TOY_BUDGETS = {"generative": 48, "yes_no": 8}  # conf/model/toy.yaml
MODEL_BUDGETS = {"generative": 512, "yes_no": 128}  # conf/model/_pretrained.yaml


def data_root(benchmark: str, given: str | None) -> Path:
    """`--data`, else the benchmark's environment variable; missing: one error naming both, the layout and source."""
    variable, layout, source = DATA[benchmark]
    value = given or os.environ.get(variable)
    if not value:
        raise FileNotFoundError(f"{benchmark} data: pass --data DIR or set {variable}. Expected layout: {layout}. Get "
                                f"it from {source}; vlmfix never downloads data.")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{benchmark} data: {str(path)!r} (from {'--data' if given else variable}) does not "
                                f"exist. Expected layout: {layout}. Get it from {source}.")
    return path


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m vlmfix.integrations.lmms_eval",
                                  description="Write lmms-eval task folders scored by vlmfix.eval.")
    commands = top.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-tasks", help="write a benchmark's task(s) (YAML, docs, utils.py) under --out")
    write.add_argument("--out", required=True, help="the folder to pass to lmms-eval's --include_path")
    write.add_argument("--benchmark", default="pope", choices=BENCHMARKS)
    source = write.add_mutually_exclusive_group()
    source.add_argument("--toy", choices=("toy", "toy_fast"), help="the toy's questions / miniatures (built, cached)")
    source.add_argument("--questions", help="pope: a POPE question file (JSON Lines or JSON array)")
    source.add_argument("--data", help="amber / mme / hallusionbench: the local release (default: its variable)")
    write.add_argument("--images", help="pope: the folder of the question file's images (with --questions)")
    write.add_argument("--name", help="the task name (amber: the prefix of <name>_generative / _discriminative)")
    write.add_argument("--split", default="random", choices=pope.SPLITS, help="pope")
    write.add_argument("--n-images", type=int, default=2, help="pope --toy: images (6 questions each)")
    write.add_argument("--parser", help="the yes/no parser (default: the benchmark's own)")
    write.add_argument("--prompt-suffix", default="", help="appended to each yes/no question")
    write.add_argument("--max-new-tokens", type=int, help="the yes/no budget (default: pope 8, others 128; toy 8)")
    write.add_argument("--max-new-tokens-generative", type=int, help="amber: the description budget (512; toy 48)")
    write.add_argument("--limit", type=int, help="the first N images (amber; mme: per subtask) or figure sets")
    write.add_argument("--parts", nargs="+", default=["generative", "discriminative"], help="amber")
    write.add_argument("--normalizer", help="amber: nltk (default) or simple (the toy's)")
    write.add_argument("--similarity", help="amber: official (default), table, spacy or none (the toy's)")
    write.add_argument("--spacy-model", help="amber --similarity spacy: an installed spaCy model")
    write.add_argument("--table", help="amber --similarity table: a similarity table file")
    write.add_argument("--threshold", type=float, default=0.8, help="amber")
    write.add_argument("--quirks", default="reference", choices=amber.QUIRK_MODES, help="amber")
    write.add_argument("--prompt", default="official", choices=("official", "lmms"), help="mme")
    write.add_argument("--subtasks", nargs="+", default=list(mme.HALLUCINATION_SUBTASKS), help="mme")
    write.add_argument("--source", default="folder", choices=("folder", "hf"), help="mme / hallusionbench --data")
    write.add_argument("--unknown-no-visual", default="correct", choices=hallusion.UNKNOWN_NO_VISUAL,
                       help="hallusionbench")
    write.add_argument("--no-text-only", action="store_true", help="hallusionbench: leave out text-only questions")
    return top


def main(argv: Sequence[str] | None = None) -> None:
    """Write the chosen benchmark's task(s) and print the lmms-eval command that runs them."""
    cli = parser()
    args = cli.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    if args.benchmark == "pope":
        paths = write_pope(cli, args, out)
    else:
        if args.questions is not None:
            cli.error("--questions is for --benchmark pope; pass --data DIR (or --toy)")
        paths = write_release(args, out)
    count = sum(len((path.parent / DOCS_FILE).read_text().splitlines()) for path in paths)
    names = ",".join(path.stem for path in paths)
    print(f"wrote {', '.join(map(str, paths))} ({count} questions); run: lmms-eval --model vlmfix --model_args "
          f"pretrained=...,methods=... --include_path {out} --tasks {names}")


def write_pope(cli: argparse.ArgumentParser, args: argparse.Namespace, out: Path) -> list[Path]:
    options: dict[str, Any] = {"split": args.split, "parser": args.parser or "official",
                               "prompt_suffix": args.prompt_suffix, "max_new_tokens": args.max_new_tokens or 8}
    if args.toy is not None:
        questions, images = toy_pope_questions(args.toy == "toy_fast", args.split, args.n_images,
                                               out / ".cache" / f"{args.toy}-{args.n_images}")
        name = args.name or f"vlmfix_{args.toy}_pope_{args.split}"
        return [write_pope_task(out, questions, images, name=name, **options)]
    if args.questions is None or args.images is None:
        cli.error("--benchmark pope needs --toy, or --questions FILE with --images DIR (the folder of its images)")
    loaded = pope.load_question_file(args.questions, split=args.split)
    name = args.name or f"vlmfix_pope_{args.split}"
    path = write_pope_task(out, list(loaded.questions), Path(args.images), name=name, question_file=loaded, **options)
    return [path]


def write_release(args: argparse.Namespace, out: Path) -> list[Path]:
    """AMBER, MME or HallusionBench from the toy's miniature or a local release."""
    toy = args.toy is not None
    root = toy_miniatures(args.toy == "toy_fast", out / ".cache" / f"miniatures-{args.toy}") if toy else None
    writer = {"amber": write_amber, "mme": write_mme, "hallusionbench": write_hallusion}[args.benchmark]
    return writer(args, out, root, f"vlmfix_{args.toy}" if toy else "vlmfix")


def write_amber(args: argparse.Namespace, out: Path, root: Path | None, prefix: str) -> list[Path]:
    budgets, toy = (TOY_BUDGETS, True) if root is not None else (MODEL_BUDGETS, False)
    data = amber.load_amber(root / "amber" if root is not None else data_root("amber", args.data))
    return write_amber_tasks(
        out, data, name=args.name or f"{prefix}_amber", parts=args.parts,
        max_new_tokens_generative=args.max_new_tokens_generative or budgets["generative"],
        max_new_tokens=args.max_new_tokens or budgets["yes_no"], parser=args.parser or "amber_exact",
        normalizer=args.normalizer or ("simple" if toy else "nltk"),
        similarity=args.similarity or ("none" if toy else "official"), spacy_model=args.spacy_model, table=args.table,
        threshold=args.threshold, quirks=args.quirks, source="toy_miniature" if toy else "folder",
        prompt_suffix=args.prompt_suffix, limit=args.limit)


def write_mme(args: argparse.Namespace, out: Path, root: Path | None, prefix: str) -> list[Path]:
    if root is not None:
        questions, source = mme.load_mme_folder(root / "mme", args.subtasks), "toy_miniature"
    elif args.source == "folder":
        questions, source = mme.load_mme_folder(data_root("mme", args.data), args.subtasks), "folder"
    else:
        images = out / ".cache" / "mme_images"
        questions, source = mme.load_mme_hf(data_root("mme", args.data), args.subtasks, images), "hf"
    budget = args.max_new_tokens or (TOY_BUDGETS if root is not None else MODEL_BUDGETS)["yes_no"]
    return [write_mme_task(out, questions, name=args.name or f"{prefix}_mme", max_new_tokens=budget,
                           parser=args.parser or "mme_official", prompt=args.prompt, source=source,
                           prompt_suffix=args.prompt_suffix, limit=args.limit)]


def write_hallusion(args: argparse.Namespace, out: Path, root: Path | None, prefix: str) -> list[Path]:
    release = root / "hallusionbench" if root is not None else data_root("hallusionbench", args.data)
    if root is None and args.source == "hf":
        questions = hallusion.load_hallusion_hf(release, out / ".cache" / "hallusionbench_images")
    else:
        questions = hallusion.load_hallusion(release)
    source = "toy_miniature" if root is not None else args.source
    hashes = {**hallusion.file_hashes(release, questions), "source": source}
    budget = args.max_new_tokens or (TOY_BUDGETS if root is not None else MODEL_BUDGETS)["yes_no"]
    return [write_hallusion_task(out, questions, hashes, name=args.name or f"{prefix}_hallusionbench",
                                 max_new_tokens=budget, parser=args.parser or "vlmevalkit_yorn",
                                 unknown_no_visual=args.unknown_no_visual, include_text_only=not args.no_text_only,
                                 prompt_suffix=args.prompt_suffix, limit=args.limit)]


if __name__ == "__main__":
    main()
