//! Test guest `other-world`: a valid component that does not implement the turnstile:rule world
//! (it exports `decide`, not `handle`). Expected: refused at load as a component of another world.

#![allow(
    unsafe_code,
    reason = "wit-bindgen's generated exports use `export_name`"
)]

wit_bindgen::generate!({
    world: "other",
    path: "wit",
});

struct Other;

impl Guest for Other {
    fn decide(input: String) -> String {
        input
    }
}

export!(Other);
