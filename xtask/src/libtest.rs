//! Counting tests from the summary line each libtest binary prints when it finishes.

use std::fmt;
use std::io::{Read, Write};
use std::ops::AddAssign;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TestCounts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestCounts {
    /// Parses a libtest summary such as
    /// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`
    /// (or `test result: FAILED. ...`); any other line gives `None`.
    pub fn parse_summary(line: &str) -> Option<Self> {
        let (_outcome, fields) = line
            .trim_end()
            .strip_prefix("test result: ")?
            .split_once(". ")?;
        let mut counts = Self::default();
        let mut saw_passed = false;
        for field in fields.split(';') {
            // Fields that are not `<number> <label>` ("finished in 0.01s") are skipped.
            let Some((number, label)) = field.trim().split_once(' ') else {
                continue;
            };
            let Ok(number) = number.parse() else {
                continue;
            };
            match label {
                "passed" => {
                    counts.passed = number;
                    saw_passed = true;
                }
                "failed" => counts.failed = number,
                "ignored" => counts.ignored = number,
                _ => {}
            }
        }
        saw_passed.then_some(counts)
    }
}

impl AddAssign for TestCounts {
    fn add_assign(&mut self, other: Self) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
    }
}

/// The one-line summary `cargo xtask test` ends with, e.g. `57 passed, 0 failed, 2 skipped`.
impl fmt::Display for TestCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.ignored > 0 {
            write!(f, ", {} skipped", self.ignored)?;
        }
        Ok(())
    }
}

/// Copies `input` to `output` as it arrives (not line by line, so a test that is still running
/// shows its `test name ... ` prefix), and adds every summary line it sees to `counts`.
/// Counts are added as they are seen, so they are kept even if copying fails halfway.
pub fn tee_and_count(
    mut input: impl Read,
    mut output: impl Write,
    counts: &mut TestCounts,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 8192];
    let mut line = Vec::new();
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&chunk[..n])?;
        output.flush()?;
        for &byte in &chunk[..n] {
            if byte == b'\n' {
                count_line(&line, counts);
                line.clear();
            } else {
                line.push(byte);
            }
        }
    }
    count_line(&line, counts);
    Ok(())
}

fn count_line(line: &[u8], counts: &mut TestCounts) {
    if let Some(found) = TestCounts::parse_summary(&String::from_utf8_lossy(line)) {
        *counts += found;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(passed: u64, failed: u64, ignored: u64) -> TestCounts {
        TestCounts {
            passed,
            failed,
            ignored,
        }
    }

    #[test]
    fn parses_a_passing_summary() {
        let line = "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.03s";
        assert_eq!(TestCounts::parse_summary(line), Some(counts(12, 0, 0)));
    }

    #[test]
    fn parses_ignored_tests() {
        let line = "test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; 5 filtered out; finished in 1.50s\n";
        assert_eq!(TestCounts::parse_summary(line), Some(counts(3, 0, 2)));
    }

    #[test]
    fn parses_a_failed_run() {
        let line = "test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.20s";
        assert_eq!(TestCounts::parse_summary(line), Some(counts(4, 1, 0)));
    }

    #[test]
    fn ignores_other_lines() {
        for line in [
            "",
            "running 3 tests",
            "test tests::parses ... ok",
            "test result: something else",
            "  test result: ok. 1 passed; 0 failed; indented output of a test, not libtest",
        ] {
            assert_eq!(TestCounts::parse_summary(line), None, "{line:?}");
        }
    }

    #[test]
    fn sums_every_binary_and_passes_output_through() {
        let output = "\
running 2 tests
test a ... ok
test b ... ignored

test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 3 tests
test c ... ok
test d ... FAILED
test e ... ok

failures:
    d

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s";
        let mut copied = Vec::new();
        let mut total = counts(10, 0, 0);
        // A one-byte reader splits every line across reads, as a slow pipe would.
        tee_and_count(OneByte(output.as_bytes()), &mut copied, &mut total).unwrap();
        assert_eq!(String::from_utf8(copied).unwrap(), output);
        assert_eq!(total, counts(13, 1, 1));
    }

    struct OneByte<R>(R);

    impl<R: Read> Read for OneByte<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let len = buf.len().min(1);
            self.0.read(&mut buf[..len])
        }
    }

    #[test]
    fn summary_line_mentions_skipped_only_when_there_are_some() {
        assert_eq!(counts(57, 0, 0).to_string(), "57 passed, 0 failed");
        assert_eq!(
            counts(55, 1, 2).to_string(),
            "55 passed, 1 failed, 2 skipped"
        );
    }
}
