//! A component of another world, for the host's tests: `policy add` must refuse it.

wit_bindgen::generate!({ world: "thing", path: "wit" });

struct Thing;

impl Guest for Thing {
    fn run() -> u32 {
        42
    }
}

export!(Thing);
