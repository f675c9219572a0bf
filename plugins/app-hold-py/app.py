"""app-hold in Python: the twin of plugins/app-hold (Rust), answering exactly as it does (the
host's tests compare the two over the same views). Built into a component with componentize-py
(plugins/build-py-js.sh).

Config: `label=KEY:VALUE` and/or `name-prefix=PREFIX`; `owner=NAME` (default `backup-app`).
Raising `Err(message)` answers the call with an error."""
from typing import List

from componentize_py_types import Err
import wit_world
from wit_world.imports import config, types


class WitWorld(wit_world.WitWorld):
    def describe(self) -> types.Description:
        return types.Description(
            name="app-hold-py",
            version="0.2.0",
            phases=[types.Phase.SNAPSHOT_CREATED, types.Phase.BEFORE_MIRROR, types.Phase.SCHEDULED],
        )

    def decide_locks(self, view: types.NodeView) -> List[types.LockRequest]:
        label = config.get("label")
        if label is not None:
            key, sep, value = label.partition(":")
            if not sep:
                raise Err(f'config label="{label}" must be KEY:VALUE')
            label = (key, value)
        prefix = config.get("name-prefix")
        if label is None and prefix is None:
            raise Err("configure label=KEY:VALUE and/or name-prefix=PREFIX")
        owner = config.get("owner")
        if owner is None:
            owner = "backup-app"
        # A snapshot matching both is locked once; ids sort oldest first, as in the view.
        matched = set()
        if label is not None:
            matched.update(s.id for s in view.snapshots_with_label(label[0], label[1]))
        if prefix is not None:
            matched.update(s.id for s in view.snapshots_with_name_prefix(prefix))
        return [
            types.LockRequest(snapshot=i, lock_type=types.LockType_Application(), value=owner)
            for i in sorted(matched)
        ]

    def plan_retention(self, view: types.NodeView) -> List[types.PruneProposal]:
        return []
