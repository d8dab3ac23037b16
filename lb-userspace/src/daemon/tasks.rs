//! The daemon's tasks: the main loop (signals, link and health events, ticks), the admin
//! socket, and the slow work (config reads, next-hop lookups) done without the daemon's lock.

use super::{host, Daemon, Options};
use crate::{
    api::{self, Reply, Request, Response},
    config, links, metrics,
    model::BackendSpec,
    net::HostResolver,
    nexthops::{self, NextHops},
};
use anyhow::{bail, Context as _, Result};
use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::Duration,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, Semaphore},
};
use tracing::{error, info, warn};

/// How often unresolved next hops are retried and some resolved ones refreshed.
const RESOLVE_INTERVAL: Duration = Duration::from_secs(1);
/// Admin connections served at once; more wait in the kernel's backlog. The CLI opens one per
/// command, so this only bounds a runaway script.
const MAX_ADMIN_CONNECTIONS: usize = 64;

/// What the daemon's tasks share. The mutex is never held across an await; a poisoned lock
/// only means a handler panicked, and the daemon's state is still the maps' truth.
struct Shared {
    daemon: Mutex<Daemon>,
    /// One reload at a time (SIGHUP and `xdplb reload` may race); held across the lookups.
    reloading: tokio::sync::Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Daemon> {
        self.daemon
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Looks up next hops without blocking the async threads.
async fn look_up(resolver: HostResolver, due: Vec<BackendSpec>) -> Result<nexthops::Answers> {
    if due.is_empty() {
        return Ok(Vec::new());
    }
    Ok(tokio::task::spawn_blocking(move || nexthops::resolve(&resolver, &due)).await?)
}

/// Looks up the next hops that are unknown or in `refresh` without the lock, then applies
/// with it.
async fn resolve_then_apply(
    shared: &Shared,
    refresh: impl FnOnce(&mut Daemon) -> BTreeSet<IpAddr>,
) -> Result<()> {
    let (resolver, due) = {
        let mut daemon = shared.lock();
        let refresh = refresh(&mut daemon);
        (daemon.resolver.clone(), daemon.due_lookups(&refresh))
    };
    let answers = look_up(resolver, due).await?;
    let mut daemon = shared.lock();
    daemon.next_hops.record(answers);
    // A reload in between may have removed some of them.
    let addresses = daemon.backend_addresses();
    daemon.next_hops.retain(&addresses);
    daemon.apply()
}

/// Re-reads the config file and applies it, then reopens the connection log's file, also
/// when the new config is rejected: logrotate's `xdplb reload` must not leave the daemon
/// writing to the rotated file.
async fn reload(shared: &Shared) -> Result<String> {
    let result = reload_config(shared).await;
    shared.lock().reopen_log();
    result
}

/// A file that fails validation, or that changes settings only a restart can apply, is
/// rejected and the running config keeps serving. The file is read and every backend looked
/// up again (a reload may change a backend's `mac` or bring new ones) without the daemon's
/// lock.
async fn reload_config(shared: &Shared) -> Result<String> {
    let _one_at_a_time = shared.reloading.lock().await;
    let (path, resolver) = {
        let daemon = shared.lock();
        (daemon.config_path.clone(), daemon.resolver.clone())
    };
    let new = config::load(&path)?;
    let everything = new.services.vips.iter().flat_map(|v| &v.backends);
    let due = NextHops::default().due(everything, &BTreeSet::new());
    let answers = look_up(resolver, due).await?;
    shared.lock().reload_with(new, answers)
}

/// Makes sure `interfaces` (configured ones) have the program as they are now, after a link
/// event or at start; looks up next hops again through an interface that came back.
async fn follow_interfaces(shared: &Shared, interfaces: &[String]) {
    let now = match links::current(interfaces).await {
        Ok(now) => now,
        Err(e) => {
            error!("reading the state of {interfaces:?}: {e}");
            return;
        }
    };
    let mut moved = BTreeSet::new();
    {
        let mut daemon = shared.lock();
        for state in &now {
            match daemon.on_link_event(state) {
                Ok(backends) => moved.extend(backends),
                Err(e) => error!("moving next hops to {} again: {e:#}", state.name()),
            }
        }
    }
    if !moved.is_empty() {
        if let Err(e) = resolve_then_apply(shared, move |_| moved).await {
            error!("next hops after {interfaces:?} came back: {e:#}");
        }
    }
}

/// Answers one admin request; only a reload does its slow part without the lock, and a
/// followed log streams without it.
async fn handle(shared: &Shared, request: Request) -> Reply {
    let result = match request {
        Request::Reload => reload(shared).await.map(Response::Done),
        Request::Log {
            vip,
            event,
            limit,
            follow: true,
        } => return shared.lock().follow_log(vip, event, limit),
        request => return Reply::One(shared.lock().handle(request)),
    };
    Reply::One(result.unwrap_or_else(|e| Response::Error(format!("{e:#}"))))
}

/// Serves the admin socket, at most [`MAX_ADMIN_CONNECTIONS`] connections at once.
async fn serve_admin(listener: tokio::net::UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                warn!("admin socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = api::serve_connection(stream, |r| handle(&shared, r)).await {
                warn!("admin connection: {e}");
            }
        });
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(options: Options) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("xdplb run needs root (it loads XDP programs and pins BPF maps)");
    }
    // First of all: SIGHUP's default action kills the process, and start-up can take seconds.
    // A reload requested meanwhile is remembered and runs once start-up is done.
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    host::raise_open_files_limit();
    let config = config::load(&options.config_path)?;
    // Subscribed before attaching, so no change after the attachment is missed.
    let interfaces = config.daemon.interfaces.clone();
    let mut link_events = links::watch(interfaces.clone())?;
    let mut neighbours =
        crate::net::watch_neighbours().context("subscribing to neighbour changes (netlink)")?;
    let (health_tx, mut health_rx) = mpsc::unbounded_channel();
    let healthz = Arc::new(AtomicBool::new(false));
    let daemon = Daemon::start(&options, config, health_tx, healthz.clone())?;
    let socket = daemon.config.daemon.admin_socket.clone();
    let metrics_listen = daemon.config.daemon.metrics_listen;
    let stats_interval = daemon.config.daemon.stats_interval;
    let shared = Arc::new(Shared {
        daemon: Mutex::new(daemon),
        reloading: tokio::sync::Mutex::new(()),
    });

    let listener = api::bind(&socket)
        .with_context(|| format!("binding the admin socket {}", socket.display()))?;
    info!(socket = %socket.display(), "admin API listening");
    let api_task = tokio::spawn(serve_admin(listener, shared.clone()));
    let metrics_task = match metrics_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding daemon.metrics_listen {listen}"))?;
            info!(%listen, "metrics on http://{listen}/metrics");
            let text = shared.clone();
            Some(tokio::spawn(metrics::serve(
                listener,
                move || text.lock().metrics_text(),
                move || healthz.load(Ordering::Relaxed),
                std::future::pending(),
            )))
        }
        None => None,
    };

    let mut resolve_tick = tokio::time::interval(RESOLVE_INTERVAL);
    let mut stats_tick = tokio::time::interval(stats_interval);
    // After a slow tick, wait a full period instead of firing the missed ones back to back:
    // rates are computed over the real time between samples either way.
    resolve_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A link pinned by the previous run may follow a netdev that left this namespace (the
    // swap then succeeded on the wrong device): what the interfaces report now is the truth.
    follow_interfaces(&shared, &interfaces).await;
    host::notify_systemd(sd_notify::NotifyState::Ready);
    info!("xdplb running");
    loop {
        tokio::select! {
            _ = hangup.recv() => match reload(&shared).await {
                Ok(msg) => info!("SIGHUP: {msg}"),
                Err(e) => error!("SIGHUP: reload rejected: {e:#}"),
            },
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(event) = link_events.recv() => {
                follow_interfaces(&shared, &[event.name().to_string()]).await;
            }
            Some(event) = health_rx.recv() => {
                let mut daemon = shared.lock();
                daemon.record_transition(&event);
                // A burst of transitions (a switch failing) becomes one update.
                while let Ok(event) = health_rx.try_recv() {
                    daemon.record_transition(&event);
                }
                if let Err(e) = daemon.apply() {
                    error!("applying a health change: {e:#}");
                }
            }
            Some(change) = neighbours.recv() => {
                let mut changes = vec![change];
                while let Ok(change) = neighbours.try_recv() {
                    changes.push(change);
                }
                let due = |daemon: &mut Daemon| daemon.neighbours_changed(&changes);
                if let Err(e) = resolve_then_apply(&shared, due).await {
                    error!("applying a neighbour change: {e:#}");
                }
            }
            _ = resolve_tick.tick() => {
                if let Err(e) = resolve_then_apply(&shared, Daemon::refresh_slice).await {
                    error!("refreshing next hops: {e:#}");
                }
                if let Err(e) = shared.lock().expire_blocks() {
                    error!("expiring blocklist entries: {e:#}");
                }
            }
            _ = stats_tick.tick() => {
                if let Err(e) = shared.lock().sample() {
                    warn!("sampling counters: {e:#}");
                }
            }
        }
    }
    host::notify_systemd(sd_notify::NotifyState::Stopping);
    // Routers move the traffic while the data path still forwards; status and metrics stay
    // up meanwhile.
    let grace = shared.lock().withdraw_all();
    if !grace.is_zero() {
        info!("VIPs withdrawn; forwarding for withdraw_grace ({grace:?}) before exiting");
        tokio::time::sleep(grace).await;
    }
    api_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    let _ = std::fs::remove_file(&socket);
    shared.lock().shutdown(options.detach_on_exit);
    Ok(())
}
