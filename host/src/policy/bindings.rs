//! Generated bindings for `holdfast:policy@0.1.0` (wit/policy.wit). Nothing outside
//! `policy/` sees these types; `convert.rs` maps them to and from the domain.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy",
});
