//! Generated bindings, one module per WIT package version (`wit/since_vX.Y.Z/`), as Zed's
//! extension host keeps them. Nothing outside `policy/` sees these types; `convert.rs` maps
//! them to and from the domain.
//!
//! A new version is a new module here plus its conversions; older modules stay frozen so the
//! components built against them keep loading (see `PolicyPre`, the dispatch).

/// `holdfast:policy@0.1.0`: the whole node view is a record copied into every call.
pub mod since_v0_1 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.1.0",
        world: "policy",
    });
}

/// `holdfast:policy@0.2.0`: the node view is a resource the policy queries.
pub mod since_v0_2 {
    wasmtime::component::bindgen!({
        path: "../wit/since_v0.2.0",
        world: "policy",
        // Resource methods look their view up in the store's table, which can fail (a
        // stale handle): that must trap, not panic.
        imports: { default: trappable },
        with: {
            "holdfast:policy/types.node-view": crate::policy::view::ViewHandle,
        },
    });
}
