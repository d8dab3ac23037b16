//! Compiles the kernel programs (lb-ebpf) with aya-build so the `xdplb` binary embeds them.
use aya_build::{build_ebpf, Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    build_ebpf(
        [Package {
            name: "lb-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}
