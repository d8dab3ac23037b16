//! The bench-only kernel programs (lb-ebpf/src/bin/bench_*.rs), loaded from where
//! lb-userspace's build script put every binary of lb-ebpf.

use anyhow::{Context as _, Result};
use aya::{programs::Xdp, Ebpf};
use lb_userspace::dataplane::OBJECT_DIR;
use std::path::Path;

/// Loads object `name` (also the name of its one XDP program) and verifies the program.
pub fn load(name: &str) -> Result<Ebpf> {
    let path = Path::new(OBJECT_DIR).join(name);
    let mut ebpf = Ebpf::load_file(&path).with_context(|| {
        format!(
            "loading {} (built by lb-userspace's build.rs)",
            path.display()
        )
    })?;
    program(&mut ebpf, name)?
        .load()
        .with_context(|| format!("verifying program {name}"))?;
    Ok(ebpf)
}

/// The XDP program `name` of a loaded object.
pub fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("no program {name} in its object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}
