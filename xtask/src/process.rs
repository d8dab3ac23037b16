//! Running external commands so that a failure always says which stage failed and the exact
//! command line to rerun it by hand.

use std::ffi::OsStr;
use std::process::{Command, ExitStatus, Output};

use anyhow::{bail, Context, Result};

/// Echoes `cmd`, runs it with the terminal as its stdin/stdout/stderr, and fails naming `stage`
/// if it does not succeed.
pub fn run(cmd: &mut Command, stage: &str) -> Result<()> {
    let line = announce(cmd, stage);
    let status = cmd.status().with_context(|| cannot_start(stage, &line))?;
    check(status, stage, &line)
}

/// Runs a probe quietly and returns what it printed; its exit status is the caller's to judge
/// (for probes such as `mountpoint -q`, failing is an answer, not an error).
pub fn probe(cmd: &mut Command, stage: &str) -> Result<Output> {
    cmd.output()
        .with_context(|| cannot_start(stage, &display(cmd)))
}

/// Prints the command about to run, in a form that can be pasted into a shell, and returns it.
pub fn announce(cmd: &Command, stage: &str) -> String {
    let line = display(cmd);
    println!("{stage}: $ {line}");
    line
}

/// Fails naming `stage` and the command line to rerun unless `status` is success.
pub fn check(status: ExitStatus, stage: &str, line: &str) -> Result<()> {
    if status.success() {
        return Ok(());
    }
    bail!(
        "{stage} failed ({status}); rerun it by hand from {}: {line}",
        crate::workspace_root().display()
    )
}

pub fn cannot_start(stage: &str, line: &str) -> String {
    format!("{stage} failed: cannot start `{line}`")
}

/// The command as a shell line: environment assignments, program and arguments, quoted where
/// the shell would otherwise split or expand them.
pub fn display(cmd: &Command) -> String {
    let env = cmd
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), quote(value?))));
    let words = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote);
    env.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_the_shell_would_mangle() {
        let mut cmd = Command::new("dpkg-query");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-W",
            "-f=${Status}\\n",
            "it's",
            "",
            "zlib1g-dev",
        ]);
        assert_eq!(
            display(&cmd),
            r"DEBIAN_FRONTEND=noninteractive dpkg-query -W '-f=${Status}\n' 'it'\''s' '' zlib1g-dev"
        );
    }
}
