"""A deliberately misbehaving policy in Python, for the host's tests: the same deadline and
memory cap must stop it as they stop a Rust one. `mode` (config): loop (never returns), alloc
(asks for 1 GiB), raise (an exception escapes), random (locks the first snapshot with a value
from os.urandom, which reads wasi:random), ok (behaves: no locks)."""
import os
from typing import List

from componentize_py_types import Err
import wit_world
from wit_world.imports import config, types


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.Description:
        return types.Description(name="hostile-py", version="0.0.1",
                                 phases=[types.Phase.SNAPSHOT_CREATED, types.Phase.RETENTION])

    def decide_locks(self, view: types.NodeView) -> List[types.LockRequest]:
        mode = config.get("mode")
        if mode == "loop":
            x = 0
            while True:
                x += 1
        if mode == "alloc":
            block = bytearray(1 << 30)
            return [types.LockRequest(snapshot=view.local_snapshots()[0].id,
                                      lock_type=types.LockType_Application(),
                                      value=str(len(block)))]
        if mode == "raise":
            raise ValueError("hostile-py raises on purpose")
        if mode == "random":
            return [types.LockRequest(snapshot=view.local_snapshots()[0].id,
                                      lock_type=types.LockType_Application(),
                                      value="drawn " + os.urandom(8).hex())]
        return []

    def plan_retention(self, view: types.NodeView) -> List[types.PruneProposal]:
        return []
