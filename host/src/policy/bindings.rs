//! Generated bindings for `holdfast:policy@0.1.0` (wit/since_v0.1.0/policy.wit). Nothing
//! outside `policy/` sees these types; `convert.rs` maps them to and from the domain.

wasmtime::component::bindgen!({
    path: "../wit/since_v0.1.0",
    world: "policy",
});
