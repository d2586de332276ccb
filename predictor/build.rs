//! Lets the binaries find libtorch at run time without LD_LIBRARY_PATH: torch-sys tells us
//! (through its `links = "tch"` metadata) which directory it linked libtorch from, and we
//! record that directory as an rpath. libtorch_cpu.so itself carries a RUNPATH to the NVIDIA
//! runtime wheels (`../../nvidia/*/lib`) that it loads, so that one directory is enough.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
