//! `xdplb stats --watch`: a refreshing view like `top` on a terminal (quit with `q` or
//! Ctrl-C), plain periodic output otherwise (logs, pipes).

use crate::stats::{render_table, Snapshot};
use anyhow::Result;
use std::{
    future::Future,
    io::{IsTerminal, Read, Write},
    time::Duration,
};

const REFRESH: Duration = Duration::from_secs(1);

/// Puts the terminal in non-canonical, no-echo mode (so `q` arrives without Enter) and
/// restores it on drop, also on errors and panics.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> std::io::Result<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(0, &mut original) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        // SAFETY: a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // Alternate screen, hidden cursor.
        print!("\x1b[?1049h\x1b[?25l");
        Ok(Self(original))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        // SAFETY: restoring the attributes read in enter().
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

pub async fn run<F, Fut>(fetch: F, json: bool) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Snapshot>>,
{
    let interactive = !json && std::io::stdout().is_terminal() && std::io::stdin().is_terminal();
    if !interactive {
        loop {
            let snapshot = fetch().await?;
            if json {
                println!("{}", serde_json::to_string(&snapshot)?);
            } else {
                println!("{}", render_table(&snapshot));
            }
            tokio::select! {
                _ = tokio::time::sleep(REFRESH) => {}
                _ = tokio::signal::ctrl_c() => return Ok(()),
            }
        }
    }
    let _terminal = RawTerminal::enter()?;
    let (quit_tx, mut quit_rx) = tokio::sync::mpsc::channel::<()>(1);
    // Blocking stdin reads live on their own thread; the process exits after `q` anyway.
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while std::io::stdin().read_exact(&mut byte).is_ok() {
            if byte[0] == b'q' || byte[0] == b'Q' {
                let _ = quit_tx.blocking_send(());
                return;
            }
        }
    });
    loop {
        let snapshot = fetch().await?;
        print!(
            "\x1b[H\x1b[2Jxdplb stats (every {}s, q to quit)\n\n{}",
            REFRESH.as_secs(),
            render_table(&snapshot).replace('\n', "\r\n")
        );
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = quit_rx.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
