"""How rank 0 learns that another rank of a data-parallel job ended: the other rank's one-line
error, left in rank 0's run folder, or, for a rank killed outright (SIGKILL, out of memory),
its process found gone. torchrun stops the remaining ranks when one ends; rank 0 then fails the
job with a line naming the rank and the cause, instead of a bare "KILLED"."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pipeline.training.distributed import World, broadcast_json

_peers: dict[int, dict] = {}  # rank -> {"host", "pid"}, as share_run_dir gathered them
WAIT_S = 3.0  # how long rank 0 looks for another rank's end
GRACE_S = 0.5  # how long a gone rank's line may take to appear


def share_run_dir(run_dir: Path, world: World) -> Path:
    """Rank 0's run folder on every rank, and every rank's host and process id on rank 0."""
    if not world.distributed:
        return run_dir
    import torch.distributed as dist

    shared = Path(broadcast_json(str(run_dir), world))
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})
    everyone: list[str | None] = [None] * world.size
    dist.all_gather_object(everyone, mine)
    _peers.clear()
    _peers.update({rank: json.loads(text) for rank, text in enumerate(everyone)})
    return shared


def error_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / f"rank{rank}.error"


def record_rank_error(run_dir: Path, world: World, line: str) -> None:
    """A non-zero rank's one-line error, for rank 0 to name."""
    path = error_file(run_dir, world.rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(line)
    except OSError:  # another node's folder, or a full disk: its console line still says it
        pass


def peer_failure(world: World, run_dir: Path) -> str | None:
    """On rank 0: the line that says which other rank ended and why, or None when none did
    (then rank 0's own error, or a Ctrl-C, is what stopped the job)."""
    if not world.distributed or not world.main:
        return None
    deadline = time.monotonic() + WAIT_S
    gone_since = None
    while time.monotonic() < deadline:
        for rank in range(1, world.size):
            path = error_file(run_dir, rank)
            if path.exists():
                return f"rank {rank} of {world.size} failed: {path.read_text().strip()}"
        gone = [rank for rank in range(1, world.size) if _gone(_peers.get(rank))]
        if gone:
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > GRACE_S:  # no line came: it was killed
                rank = gone[0]
                return (
                    f"rank {rank} of {world.size} (pid {_peers[rank]['pid']}) ended without a "
                    "word: killed (SIGKILL, out of memory or a reset machine); the job stopped, "
                    "and a re-run starts it again"
                )
        time.sleep(0.1)
    return None


def _gone(peer: dict | None) -> bool:
    """A process of this host that no longer exists (other hosts' cannot be seen from here)."""
    if not peer or peer.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(peer["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
