"""What a client keeps between rounds (SCAFFOLD's c_i), on disk, so a resumed run has it.

A node's in-memory state (Flower's `context.state`) dies with the run; a resumed run is a new
run. With checkpoints on, the server half names in every train ConfigRecord a folder
(`state-dir`) and this run (`state-id`); the client then keeps its state in

    <state-dir>/<state-id>/client-<id>.round-<r>.npz

one file per round it trained in, written atomically. When round r's message arrives the
server has checkpointed round r - 1, so the client reads its newest file of a round before r:
exactly the state an uninterrupted run would have, even if an interrupted attempt already
trained round r. Files of rounds >= r (that attempt's) and older ones are deleted then, so a
client holds at most two. In simulation `state-dir` lies under the run's checkpoint folder;
in a deployment a node may keep its own (`state-dir` in its node config).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from .base import ArrayDict
from .server import load_checkpoint, save_checkpoint

_FILE = re.compile(r"client-(\d+)\.round-(\d+)\.npz")


class ClientStateStore:
    """Round-versioned state files of one client.

    Parameters
    ----------
    folder : Path
        `<state-dir>/<state-id>`: this run's state files.
    client_id : int
        The client's stable id (its partition id).
    """

    def __init__(self, folder: Path, client_id: int) -> None:
        self.folder = Path(folder)
        self.client_id = int(client_id)

    def path(self, server_round: int) -> Path:
        """The file of the state after training in `server_round`."""
        return self.folder / f"client-{self.client_id:05d}.round-{server_round:05d}.npz"

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        matches = (_FILE.fullmatch(p.name) for p in self.folder.iterdir())
        return sorted(int(m[2]) for m in matches if m and int(m[1]) == self.client_id)

    def load(self, server_round: int) -> dict[str, ArrayDict]:
        """The state as of the client's last round before `server_round` ({} if none), after
        deleting the files no resume can need any more. A damaged file raises
        `strategies.server.CheckpointError` naming it."""
        rounds = self._rounds()
        before = [r for r in rounds if r < server_round]
        keep = before[-1] if before else None
        for r in rounds:
            if r != keep:
                self.path(r).unlink(missing_ok=True)
        if keep is None:
            return {}
        groups, _ = load_checkpoint(self.path(keep))
        return groups

    def save(self, server_round: int, state: Mapping[str, ArrayDict]) -> None:
        """Write the state after training in `server_round` (atomically; nothing for an empty
        state)."""
        if state:
            save_checkpoint(
                self.path(server_round), state, {"round": server_round, "client": self.client_id}
            )
