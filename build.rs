//! Lets the installed plugin find the libnftnl/libmnl copies the installer ships beside it
//! (`<cni bin dir>/mesh-redirect.libs/`) before the node's own: nodes need not have them.
fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--enable-new-dtags,-rpath,$ORIGIN/mesh-redirect.libs");
    println!("cargo:rerun-if-changed=build.rs");
}
