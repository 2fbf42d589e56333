//! The end-to-end test package. Its tests are in `e2e/`; this library is empty and exists only
//! because a package needs a target for its build script to attach to.
