"""Sharded runs: which files shard K of N classifies, and the merge of the shards' outputs.

`classify_dir.py DIR --shard K/N` classifies the files whose relative path hashes to K (0-based,
as Kubernetes' JOB_COMPLETION_INDEX): each file's shard depends on its path alone, so N clients
on N machines split one directory without talking to each other, and adding files never moves
another file to another shard. The merge checks that the shards cover every file exactly once
(--dir: every file under DIR; --shards N: each output is one whole shard of N, each shard once)
and that they were classified by one model:

    .venv/bin/python scripts/merge_shards.py merged.jsonl shard-*.jsonl --dir DIR --shards N
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from client.results import FIELDS, RowWriter, read_rows
from core.errors import UserError, command
from core.files import DEFAULT_EXTENSIONS, iter_files, parse_extensions
from core.rows import typed_row

SHOWN = 5  # paths named in an error line; the rest are counted


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' -> (K, N) with 0 <= K < N; UserError otherwise."""
    k, sep, n = text.partition("/")
    if not sep or not (k.strip().isascii() and k.strip().isdigit()) or not (n.strip().isascii()
                                                                           and n.strip().isdigit()):
        raise UserError(f"--shard must be K/N with whole numbers, K counted from 0 (e.g. 0/4), not '{text}'")
    k_, n_ = int(k), int(n)
    if n_ < 1 or k_ >= n_:
        raise UserError(f"--shard {text}: K must be 0..N-1 and N >= 1 (shards are counted from 0, "
                        f"as JOB_COMPLETION_INDEX)")
    return k_, n_


def shard_of(rel: str, shards: int) -> int:
    """The shard of a relative path: a hash of its UTF-8 bytes (not Python's per-process hash())."""
    digest = hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def _named(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def _check_shards(inputs: list[Path], shards_in: dict[Path, set[int]], shards: int) -> list[int]:
    """--shards N: each output holds one shard K, each K of 0..N-1 once; returns the K of no rows."""
    if len(inputs) != shards:
        raise UserError(f"--shards {shards} needs {shards} shard outputs, got {len(inputs)}")
    mixed = [f"{p} (shards {', '.join(map(str, sorted(ks)))})" for p, ks in shards_in.items() if len(ks) > 1]
    if mixed:
        raise UserError(f"outputs holding rows of more than one shard of {shards}: {_named(mixed)}")
    owners: dict[int, list[str]] = {}
    for path, ks in shards_in.items():
        for k in ks:
            owners.setdefault(k, []).append(str(path))
    twice = [f"shard {k} ({', '.join(names)})" for k, names in sorted(owners.items()) if len(names) > 1]
    if twice:
        raise UserError(f"shards in more than one output: {_named(twice)}")
    # an output with no rows is a shard with no files (classify_dir writes an empty output then)
    return sorted(set(range(shards)) - owners.keys())


def merge_shards(inputs: list[Path], output: Path, root: Path | None = None,
                 extensions: set[str] | None = None, recursive: bool = True,
                 shards: int | None = None, skip_unreadable: bool = False,
                 allow_mixed_versions: bool = False) -> tuple[int, int, list[int], dict[str, int]]:
    """Check the shards cover each file once (every file under `root`, every shard of `shards`
    when given) with one model; write them merged.

    Returns (files, failed, the shards of no rows, rows per model version). UserError naming an
    unreadable line (unless skip_unreadable), duplicates, missing or foreign files, missing or mixed
    shards, two models, or two versions (unless allow_mixed_versions); nothing is written then.
    """
    rows: dict[str, dict] = {}
    where: dict[str, list[str]] = {}
    shards_in: dict[Path, set[int]] = {}
    models: dict[str, list[str]] = {}
    versions: dict[str, list[str]] = {}
    for path in inputs:
        if not path.is_file():
            raise UserError(f"shard output not found: {path}")
        if path.resolve() == output.resolve():
            raise UserError(f"the merged output {output} is also an input: name another file")
        shards_in[path] = set()
        for line, row in read_rows(path, strict=not skip_unreadable):
            rel = row.get("path")
            if not isinstance(rel, str) or not rel:
                if skip_unreadable:
                    continue
                raise UserError(f"{path}:{line}: a row without a path")
            typed = typed_row(row, f"{path}:{line}")
            where.setdefault(rel, []).append(path.name)
            rows.setdefault(rel, typed)
            if shards:
                shards_in[path].add(shard_of(rel, shards))
            if typed.get("model") is not None:
                names = models.setdefault(str(typed["model"]), [])
                if str(path) not in names:
                    names.append(str(path))
            if typed.get("model_version") is not None and rel in rows and rows[rel] is typed:
                versions.setdefault(str(typed["model_version"]), []).append(path.name)
    if len(models) > 1:
        raise UserError("rows of more than one model: " + "; ".join(
            f"{model} ({_named(names)})" for model, names in sorted(models.items())))
    if len(versions) > 1 and not allow_mixed_versions:
        raise UserError("rows of more than one model version: " + "; ".join(
            f"{v}: {len(names)} rows ({_named(sorted(set(names)))})" for v, names in sorted(versions.items()))
            + "; pass --allow-mixed-versions to merge them")
    duplicates = sorted(rel for rel, names in where.items() if len(names) > 1)
    if duplicates:
        raise UserError(f"{len(duplicates)} files have more than one row: " + _named(
            [f"{rel} ({', '.join(where[rel])})" for rel in duplicates]))
    empty = _check_shards(inputs, shards_in, shards) if shards else []
    if root is not None:
        if not root.is_dir():
            raise UserError(f"not a folder: {root}")
        skip = frozenset({output, *inputs})
        expected = {p.relative_to(root).as_posix()
                    for p in iter_files(root, extensions or parse_extensions(DEFAULT_EXTENSIONS), recursive, skip)}
        missing = sorted(expected - rows.keys())
        if missing:
            raise UserError(f"{len(missing)} files under {root} are in no shard output: {_named(missing)}")
        foreign = sorted(rows.keys() - expected)
        if foreign:
            raise UserError(f"{len(foreign)} rows name files not under {root}: {_named(foreign)}")
    if not rows:
        raise UserError(f"no rows in {', '.join(map(str, inputs))}")
    extra = tuple(sorted({k for row in rows.values() for k in row} - set(FIELDS)))
    writer = RowWriter(output, FIELDS + extra, append=False)
    try:
        for rel in sorted(rows):
            writer.write(rows[rel])
    finally:
        writer.close()
    return (len(rows), sum(row.get("status") != "ok" for row in rows.values()), empty,
            {v: len(names) for v, names in sorted(versions.items())})


def get_args_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description="Merge the outputs of classify_dir.py --shard K/N runs, "
                                                 "checking that they cover every file exactly once.")
    parser.add_argument("output", metavar="OUTPUT", help="merged rows: JSONL, or CSV when it ends in .csv")
    parser.add_argument("inputs", metavar="SHARD_OUTPUT", nargs="+",
                        help="the shards' outputs (JSONL or CSV)")
    parser.add_argument("--dir", default=None,
                        help="the classified DIR: also check that no file under it is missing")
    parser.add_argument("--shards", type=int, default=None, metavar="N",
                        help="the runs' N of --shard K/N: check that each output holds exactly one shard "
                             "and every shard 0..N-1 is there once")
    parser.add_argument("--extensions", default=DEFAULT_EXTENSIONS,
                        help="with --dir: the extensions the runs used (default: %(default)s)")
    parser.add_argument("--no-recursive", action="store_true",
                        help="with --dir: the runs used --no-recursive")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip lines that cannot be read (cut short, not rows) instead of refusing; "
                             "with --dir or --shards their files then show as missing")
    parser.add_argument("--allow-mixed-versions", action="store_true",
                        help="merge rows of different model versions (a rollout during the runs)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Merge; exit code 0 all ok, 1 some files failed, 2 the shards do not cover the files once."""
    output = Path(args.output)
    if not output.parent.is_dir():
        raise UserError(f"output folder not found: {output.parent}")
    if output.is_dir():
        raise UserError(f"{output} is a folder: name the merged output's file")
    if args.shards is not None and args.shards < 1:
        raise UserError(f"--shards must be at least 1, not {args.shards}")
    files, failed, empty, versions = merge_shards(
        [Path(p) for p in args.inputs], output, Path(args.dir) if args.dir else None,
        parse_extensions(args.extensions), not args.no_recursive, args.shards, args.skip_unreadable,
        args.allow_mixed_versions)
    covered = [f"every file under {args.dir} exactly once"] if args.dir else ["no file twice"]
    if args.shards:
        covered.append(f"each of {args.shards} shards once"
                       + (f", shards {', '.join(map(str, empty))} with no files" if empty else ""))
    if not args.dir and not args.shards:
        covered.append("completeness NOT checked: give --dir DIR or --shards N")
    merged = ", ".join(f"{v}: {n}" for v, n in versions.items()) or "none named"
    print(f"merge_shards: {len(args.inputs)} outputs, {files} files ({'; '.join(covered)}), "
          f"ok {files - failed}, failed {failed}, model versions {merged} -> {output}")
    return 1 if failed else 0


cli = command(main, get_args_parser)
