"""Move runs that are still training to another machine, so that ``--resume=True`` goes on there.

A resumable run (``--resume=True --checkpoint_dir=DIR``) keeps in ``DIR``: its best checkpoint so far
``<model>-<dataset>-<run fingerprint>.pth``, the ``.last`` checkpoint written after every epoch
(model, optimiser, early-stopping state, random state) and the files of its finished stages. ``pack``
puts those files into one tar archive; ``unpack`` puts them back into a checkpoint directory, where
the same command resumes each run at the epoch it had reached (the fingerprints in the names still
decide what is reused: a run whose config, data, code or packages differ starts afresh).

Left out: run records (``runs/``, kept beside the reports), the checkpoints of finished runs (those
with a record: it holds the result, and the same command reuses it), locks, temporary files and the
text-embedding cache (recomputed), and the optimiser state inside a best-so-far checkpoint (a run
resumes from its ``.last`` file, which keeps it; the best checkpoint is read for its weights only):
about a third of the archive. So an unpacked best checkpoint cannot be given as ``resume_checkpoint``
(RecBole's resume reads the optimiser state); the ``.last`` file beside it can.

    python -m recbole_genrec.evaluation.carry pack CHECKPOINT_DIR ARCHIVE
    python -m recbole_genrec.evaluation.carry unpack ARCHIVE CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
import tarfile

LAST = ".last"
_FINGERPRINT = re.compile(r"-([0-9a-f]{16})\.pth$")


def _finished(checkpoint_dir: str) -> set[str]:
    """Run fingerprints that have a run record in ``checkpoint_dir/runs``."""
    runs = os.path.join(checkpoint_dir, "runs")
    names = os.listdir(runs) if os.path.isdir(runs) else []
    return {m.group(1) for m in (re.search(r"-([0-9a-f]{16})\.json$", n) for n in names) if m}


def carried_files(checkpoint_dir: str) -> list[str]:
    """Names (relative to ``checkpoint_dir``) of the files :func:`pack` carries, sorted."""
    names = set(os.listdir(checkpoint_dir))
    finished = _finished(checkpoint_dir)
    out = []
    for name in names:
        if not os.path.isfile(os.path.join(checkpoint_dir, name)):
            continue
        run = name[: -len(LAST)] if name.endswith(".pth" + LAST) else name
        if not run.endswith(".pth"):
            continue
        m = _FINGERPRINT.search(run)
        if not (m and m.group(1) in finished):  # a run in training (best so far, .last), or a stage file
            out.append(name)
    return sorted(out)


def _without_optimizer(path: str) -> bytes | None:
    """The bytes of the best-so-far checkpoint ``path`` without its optimiser state, or ``None``
    when it is not a checkpoint that holds one."""
    import torch

    from recbole_genrec.compat import safe_torch_load

    try:
        state = safe_torch_load(path, map_location="cpu")
    except Exception:  # noqa: BLE001 - not a torch checkpoint: carried as it is
        return None
    if not isinstance(state, dict) or "optimizer" not in state:
        return None
    buffer = io.BytesIO()
    torch.save({key: value for key, value in state.items() if key != "optimizer"}, buffer)
    return buffer.getvalue()


def pack(checkpoint_dir: str, archive: str) -> list[str]:
    """Write ``archive`` (a tar file, written under a temporary name and renamed) with the files of
    :func:`carried_files` (best-so-far checkpoints without their optimiser state); return their names."""
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"carry pack: checkpoint directory {checkpoint_dir!r} does not exist")
    files = carried_files(checkpoint_dir)
    os.makedirs(os.path.dirname(os.path.abspath(archive)), exist_ok=True)
    tmp = f"{archive}.{os.getpid()}.tmp"
    try:
        with tarfile.open(tmp, "w") as tar:
            for name in files:
                path = os.path.join(checkpoint_dir, name)
                info = tar.gettarinfo(path, arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""  # same bytes, same archive
                slim = _without_optimizer(path) if name + LAST in files else None  # a run's best so far
                if slim is not None:
                    info.size = len(slim)
                    tar.addfile(info, io.BytesIO(slim))
                    continue
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        os.replace(tmp, archive)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return files


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unpack(archive: str, checkpoint_dir: str, force: bool = False) -> list[str]:
    """Put the files of ``archive`` into ``checkpoint_dir`` (each written under a temporary name and
    renamed); return their names. A file already there with other content is an error (nothing is
    written) unless ``force``: it may hold epochs the archive does not. A best checkpoint already
    there that is the archive's plus its optimiser state (the directory it was packed from) is kept."""
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"carry unpack: archive {archive!r} does not exist")
    os.makedirs(checkpoint_dir, exist_ok=True)
    with tarfile.open(archive, "r") as tar:
        members = tar.getmembers()
        for m in members:
            if not m.isfile() or os.path.basename(m.name) != m.name:
                raise ValueError(f"carry unpack: {archive!r} holds {m.name!r}, not a plain file name")
        names, keep = {m.name for m in members}, set()
        if not force:
            for m in members:
                target = os.path.join(checkpoint_dir, m.name)
                if os.path.exists(target):
                    data = tar.extractfile(m).read()
                    if hashlib.sha256(data).hexdigest() == _digest(target):
                        continue
                    if m.name + LAST in names and _without_optimizer(target) == data:
                        keep.add(m.name)  # the packed best checkpoint itself, optimiser state included
                        continue
                    raise FileExistsError(f"carry unpack: {target} exists with other content (it may hold "
                                          "later epochs); pass --force to replace it")
        for m in members:
            if m.name in keep:
                continue
            target = os.path.join(checkpoint_dir, m.name)
            tmp = f"{target}.{os.getpid()}.tmp"
            with open(tmp, "wb") as out:
                out.write(tar.extractfile(m).read())
            os.replace(tmp, target)
    return [m.name for m in members]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recbole_genrec.evaluation.carry", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="archive the runs in training of a checkpoint directory")
    p.add_argument("checkpoint_dir")
    p.add_argument("archive")
    u = sub.add_parser("unpack", help="restore an archive into a checkpoint directory")
    u.add_argument("archive")
    u.add_argument("checkpoint_dir")
    u.add_argument("--force", action="store_true", help="replace files that differ")
    args = parser.parse_args(argv)
    if args.command == "pack":
        files = pack(args.checkpoint_dir, args.archive)
        size = os.path.getsize(args.archive) / 2**20
        print(f"packed {len(files)} files ({size:.1f} MiB) into {args.archive}")
    else:
        files = unpack(args.archive, args.checkpoint_dir, force=args.force)
        print(f"unpacked {len(files)} files into {args.checkpoint_dir}")
    for name in files:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
