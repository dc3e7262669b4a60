//! A reactor: one `epoll` set and a fixed small number of worker threads serving any number of
//! sources (listening sockets, vfio-user connections, doorbells, deadlines), so that a host
//! with a thousand devices runs on as many threads as it has CPUs rather than two per device.
//!
//! A source is a [`Handler`]: it may own one fd (watched for reading and/or writing) and may
//! ask to be called at a deadline. The reactor calls [`Handler::on_event`] when the fd is
//! ready, when the deadline passes, or when someone [`wake`](Reactor::wake)s it; the handler
//! does what it can without blocking and answers with its next [`Wait`] (or
//! [`Next::Remove`]). One source is never run by two workers at once (its fd is armed
//! one-shot and re-armed after the call), so a handler needs no locking of its own state.
//!
//! A device author with many devices builds on this directly: one
//! [`ServerConnection`](iopf_vfio_user::ServerConnection) handler per vfio-user connection,
//! one handler per doorbell, one listener handler that registers the connections it accepts:
//!
//! ```
//! use std::os::fd::{AsFd, BorrowedFd};
//! use std::time::{Duration, Instant};
//! use iopf_host::reactor::{Context, Handler, Next, Reactor, Ready, Wait};
//! use iopf_queue::Doorbell;
//!
//! /// Counts the rings of a doorbell; gives up after a while.
//! struct Counter { bell: Doorbell, rings: u64, until: Instant }
//!
//! impl Handler for Counter {
//!     fn fd(&self) -> Option<BorrowedFd<'_>> { Some(self.bell.as_fd()) }
//!     fn on_event(&mut self, cx: &Context<'_>, ready: Ready) -> Next {
//!         self.rings += self.bell.drain().unwrap_or(0);
//!         if self.rings >= 3 || cx.now() >= self.until {
//!             return Next::Remove;
//!         }
//!         Next::Wait(Wait::readable().until(self.until))
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let reactor = Reactor::new()?;
//! let workers = reactor.spawn_workers(2)?;
//! let bell = Doorbell::new()?;
//! let ring = bell.try_clone()?;
//! let until = Instant::now() + Duration::from_secs(10);
//! reactor.register(Box::new(Counter { bell, rings: 0, until }), Wait::readable())?;
//! for _ in 0..3 { ring.ring()?; std::thread::sleep(Duration::from_millis(5)); }
//! reactor.stop();
//! workers.join();
//! # Ok(())
//! # }
//! ```
//!
//! Rules for handlers: never block (every read and write non-blocking, no sleeping, no lock
//! held for long), and do a bounded amount of work per call (a source that has more to do asks
//! for an immediate deadline, [`Wait::until`] now, and the reactor comes back after others
//! had their turn).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, Timespec, epoll};
use thiserror::Error;

/// Events one `epoll_wait` returns at most (more stay ready for the next wait).
const EVENTS_PER_WAIT: usize = 64;

/// The longest a worker sleeps without a deadline (it then looks for timers set by others).
const MAX_SLEEP: Duration = Duration::from_millis(200);

/// Timers one worker fires at most between two `epoll_wait`s.
const TIMERS_PER_PASS: usize = 256;

/// The token of the reactor's own wake eventfd.
const WAKE_TOKEN: u64 = 0;

/// A source's name in its reactor (never reused by that reactor).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(u64);

/// Why a reactor call failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReactorError {
    /// The epoll set or the wake eventfd could not be created.
    #[error("cannot create the reactor's epoll set")]
    Create(#[source] io::Error),
    /// A source's fd could not be added to the epoll set.
    #[error("cannot add a source's fd to the epoll set")]
    Register(#[source] io::Error),
    /// A worker thread could not be started.
    #[error("cannot start a reactor worker thread")]
    Spawn(#[source] io::Error),
}

/// What woke a source (several may be true at once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ready {
    /// The fd is readable.
    pub readable: bool,
    /// The fd is writable.
    pub writable: bool,
    /// The fd reported hang-up or an error (the peer is gone; reading says more).
    pub hangup: bool,
    /// The source's deadline passed, or it was [woken](Reactor::wake).
    pub deadline: bool,
}

/// What a source waits for next: readiness of its fd and/or a deadline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wait {
    /// Call when the fd is readable.
    pub read: bool,
    /// Call when the fd is writable.
    pub write: bool,
    /// Call at this time even if the fd stays quiet (`None`: no deadline).
    pub deadline: Option<Instant>,
}

impl Wait {
    /// Wait for the fd to be readable.
    pub fn readable() -> Self {
        Self {
            read: true,
            ..Self::default()
        }
    }

    /// Wait only for a deadline.
    pub fn at(deadline: Instant) -> Self {
        Self {
            deadline: Some(deadline),
            ..Self::default()
        }
    }

    /// The same, and also for the fd to be writable if `write`.
    pub fn writable_if(self, write: bool) -> Self {
        Self {
            write: self.write || write,
            ..self
        }
    }

    /// The same, with a deadline (the earlier of the two if it had one).
    pub fn until(self, deadline: Instant) -> Self {
        self.until_opt(Some(deadline))
    }

    /// The same, with a deadline if `deadline` is `Some` (the earlier of the two if it had
    /// one).
    pub fn until_opt(self, deadline: Option<Instant>) -> Self {
        let deadline = match (self.deadline, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self { deadline, ..self }
    }
}

/// What a source wants after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Keep the source, and call it again on this.
    Wait(Wait),
    /// Forget the source: its fd leaves the epoll set and the handler is dropped (closing
    /// what it owns).
    Remove,
}

/// What a handler gets at each call: the time, and the reactor (to register sources, e.g.
/// the connections a listener accepts).
#[derive(Debug)]
pub struct Context<'a> {
    reactor: &'a Reactor,
    now: Instant,
    id: SourceId,
}

impl Context<'_> {
    /// The reactor running the handler.
    pub fn reactor(&self) -> &Reactor {
        self.reactor
    }

    /// The time the call started (deadlines are compared with it).
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The source being called.
    pub fn id(&self) -> SourceId {
        self.id
    }

    /// Stops watching `fd`, an fd this source is about to give up (close). A source whose
    /// [`Handler::fd`] changes calls this for the old fd while it still owns it; the reactor
    /// watches the new one after the call.
    pub fn unwatch(&self, fd: BorrowedFd<'_>) {
        // Fails only if the fd was not watched: then there is nothing to undo.
        let _ = epoll::delete(&self.reactor.inner.epoll, fd);
    }
}

/// One source of a reactor. See the module docs for the rules a handler keeps.
pub trait Handler: Send {
    /// The fd to watch, if any. It may change between two calls: the handler then calls
    /// [`Context::unwatch`] for the old one before closing it.
    fn fd(&self) -> Option<BorrowedFd<'_>>;

    /// Does what `ready` allows without blocking, and says what to wait for next.
    fn on_event(&mut self, cx: &Context<'_>, ready: Ready) -> Next;

    /// Called once when the reactor stops with the source still registered (the handler is
    /// dropped right after): the place to say goodbye to a peer. The default does nothing.
    fn on_stop(&mut self) {}
}

/// A registered source: its handler and its current deadline's generation.
struct Entry {
    state: Mutex<EntryState>,
}

struct EntryState {
    /// `None` once removed.
    handler: Option<Box<dyn Handler>>,
    /// Bumped at every new deadline; a timer of an older generation is stale.
    generation: u64,
}

/// A timer: when, which source, which generation of its deadline ([`FORCED`]: a wake that no
/// later deadline cancels).
type Timer = Reverse<(Instant, u64, u64)>;

/// Generation of a timer set by [`Reactor::wake`].
const FORCED: u64 = u64::MAX;

struct Inner {
    epoll: OwnedFd,
    wake: OwnedFd,
    sources: Mutex<HashMap<u64, Arc<Entry>>>,
    timers: Mutex<BinaryHeap<Timer>>,
    next_token: AtomicU64,
    stopping: AtomicBool,
}

/// The reactor: cheap to clone (every clone is the same reactor).
#[derive(Clone)]
pub struct Reactor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("sources", &self.len())
            .finish_non_exhaustive()
    }
}

/// The worker threads of a reactor ([`Reactor::spawn_workers`]).
#[derive(Debug)]
pub struct Workers {
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// How many threads.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }

    /// Waits for every worker to return (after [`Reactor::stop`]).
    pub fn join(self) {
        for thread in self.threads {
            // A worker that panicked has nothing more to give back; the others are joined.
            let _ = thread.join();
        }
    }
}

fn epoll_flags(wait: &Wait) -> epoll::EventFlags {
    let mut flags = epoll::EventFlags::ONESHOT;
    if wait.read {
        flags |= epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
    }
    if wait.write {
        flags |= epoll::EventFlags::OUT;
    }
    flags
}

fn timespec(duration: Duration) -> Timespec {
    Timespec {
        tv_sec: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(duration.subsec_nanos()),
    }
}

impl Reactor {
    /// An empty reactor with no workers yet.
    pub fn new() -> Result<Self, ReactorError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| ReactorError::Create(e.into()))?;
        let wake = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| ReactorError::Create(e.into()))?;
        epoll::add(
            &epoll,
            &wake,
            epoll::EventData::new_u64(WAKE_TOKEN),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )
        .map_err(|e| ReactorError::Create(e.into()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                epoll,
                wake,
                sources: Mutex::new(HashMap::new()),
                timers: Mutex::new(BinaryHeap::new()),
                next_token: AtomicU64::new(WAKE_TOKEN + 1),
                stopping: AtomicBool::new(false),
            }),
        })
    }

    /// Starts `threads` worker threads (at least one) named `reactor-N`.
    pub fn spawn_workers(&self, threads: usize) -> Result<Workers, ReactorError> {
        let mut workers = Workers {
            threads: Vec::new(),
        };
        for n in 0..threads.max(1) {
            let reactor = self.clone();
            let thread = std::thread::Builder::new()
                .name(format!("reactor-{n}"))
                .spawn(move || reactor.run())
                .map_err(ReactorError::Spawn)?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// Sources registered.
    pub fn len(&self) -> usize {
        self.inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no source is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a source, waiting for `wait`.
    pub fn register(
        &self,
        handler: Box<dyn Handler>,
        wait: Wait,
    ) -> Result<SourceId, ReactorError> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            state: Mutex::new(EntryState {
                handler: None,
                generation: 0,
            }),
        });
        // Hold the entry's lock until the handler is in place, so a worker that sees the fd
        // ready at once waits for it.
        let mut state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(token, entry.clone());
        if let Some(fd) = handler.fd() {
            let added = epoll::add(
                &self.inner.epoll,
                fd,
                epoll::EventData::new_u64(token),
                epoll_flags(&wait),
            );
            if let Err(error) = added {
                drop(state);
                self.forget(token);
                return Err(ReactorError::Register(error.into()));
            }
        }
        state.handler = Some(handler);
        if let Some(deadline) = wait.deadline {
            self.set_timer(deadline, token, 0);
        }
        drop(state);
        Ok(SourceId(token))
    }

    /// Calls source `id` soon with [`Ready::deadline`] set, from any thread (e.g. after
    /// handing it work through a queue). Nothing happens if it has been removed.
    pub fn wake(&self, id: SourceId) {
        self.set_timer(Instant::now(), id.0, FORCED);
    }

    /// Calls every source soon with [`Ready::deadline`] set (e.g. after setting a flag they
    /// all look at).
    pub fn wake_all(&self) {
        let tokens: Vec<u64> = self
            .inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        let now = Instant::now();
        let mut timers = self
            .inner
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for token in tokens {
            timers.push(Reverse((now, token, FORCED)));
        }
        drop(timers);
        self.kick();
    }

    /// Stops the reactor: every worker returns after its current call, the sources still
    /// registered get [`Handler::on_stop`] and are dropped.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Runs a worker on the calling thread until [`stop`](Self::stop) (what each thread of
    /// [`spawn_workers`](Self::spawn_workers) does).
    pub fn run(&self) {
        let mut events = [const { MaybeUninit::<epoll::Event>::uninit() }; EVENTS_PER_WAIT];
        while !self.stopping() {
            let timeout = self.next_timeout();
            let fired = match epoll::wait(&self.inner.epoll, &mut events, Some(&timeout)) {
                Ok((fired, _)) => &*fired,
                // EINTR (a signal): wait again. Nothing else can fail on an epoll fd we own
                // with a valid buffer; the timers below run either way.
                Err(_) => &[],
            };
            for event in fired {
                let token = event.data.u64();
                if token == WAKE_TOKEN {
                    // Edge-triggered; drained so the counter never fills. Nothing to read is
                    // fine: another worker drained it.
                    let mut buf = [0u8; 8];
                    let _ = rustix::io::read(&self.inner.wake, &mut buf);
                    continue;
                }
                let flags = event.flags;
                let ready = Ready {
                    readable: flags.contains(epoll::EventFlags::IN),
                    writable: flags.contains(epoll::EventFlags::OUT),
                    hangup: flags.intersects(
                        epoll::EventFlags::HUP | epoll::EventFlags::ERR | epoll::EventFlags::RDHUP,
                    ),
                    deadline: false,
                };
                self.dispatch(token, None, ready);
            }
            self.fire_timers();
        }
        // Pass the stop on to a worker still asleep.
        self.kick();
        self.drop_sources();
    }

    /// Writes the wake eventfd: a sleeping worker returns from `epoll_wait`.
    fn kick(&self) {
        // EAGAIN only if the counter is full, when a wake-up is pending anyway.
        let _ = rustix::io::write(&self.inner.wake, &1u64.to_ne_bytes());
    }

    fn set_timer(&self, when: Instant, token: u64, generation: u64) {
        let mut timers = self
            .inner
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let earliest = timers
            .peek()
            .is_none_or(|Reverse((first, _, _))| when < *first);
        timers.push(Reverse((when, token, generation)));
        drop(timers);
        if earliest {
            // Workers asleep computed their timeout from a later timer.
            self.kick();
        }
    }

    fn next_timeout(&self) -> Timespec {
        let timers = self
            .inner
            .timers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sleep = timers.peek().map_or(MAX_SLEEP, |Reverse((when, _, _))| {
            when.saturating_duration_since(Instant::now())
        });
        timespec(sleep.min(MAX_SLEEP))
    }

    /// Runs the sources whose deadline had passed when the pass began, at most
    /// [`TIMERS_PER_PASS`]: a source that asks to run again at once is run at the next pass,
    /// after the fds that became ready meanwhile.
    fn fire_timers(&self) {
        let now = Instant::now();
        for _ in 0..TIMERS_PER_PASS {
            let due = {
                let mut timers = self
                    .inner
                    .timers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match timers.peek() {
                    Some(Reverse((when, _, _))) if *when <= now => timers.pop(),
                    _ => None,
                }
            };
            let Some(Reverse((_, token, generation))) = due else {
                return;
            };
            let ready = Ready {
                deadline: true,
                ..Ready::default()
            };
            self.dispatch(token, Some(generation), ready);
            if self.stopping() {
                return;
            }
        }
    }

    /// Runs source `token`'s handler (a timer of `generation`, or an fd event).
    fn dispatch(&self, token: u64, generation: Option<u64>, ready: Ready) {
        let entry = self
            .inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&token)
            .cloned();
        let Some(entry) = entry else { return };
        let mut state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(generation) = generation
            && generation != FORCED
            && generation != state.generation
        {
            // A deadline since replaced.
            return;
        }
        let Some(handler) = state.handler.as_mut() else {
            return;
        };
        let cx = Context {
            reactor: self,
            now: Instant::now(),
            id: SourceId(token),
        };
        let next = handler.on_event(&cx, ready);
        match next {
            Next::Remove => {
                if let Some(handler) = state.handler.take() {
                    if let Some(fd) = handler.fd() {
                        // Fails only if the fd was never added or is closed: gone either way.
                        let _ = epoll::delete(&self.inner.epoll, fd);
                    }
                    drop(handler);
                }
                drop(state);
                self.forget(token);
            }
            Next::Wait(wait) => {
                if let Some(fd) = handler.fd() {
                    let data = epoll::EventData::new_u64(token);
                    let armed = match epoll::modify(&self.inner.epoll, fd, data, epoll_flags(&wait))
                    {
                        // A new fd (the source changed it, see `Context::unwatch`).
                        Err(rustix::io::Errno::NOENT) => {
                            epoll::add(&self.inner.epoll, fd, data, epoll_flags(&wait))
                        }
                        other => other,
                    };
                    if armed.is_err() {
                        // The fd cannot be watched any more (closed under us): the source
                        // could never be called again, so it goes.
                        if let Some(mut handler) = state.handler.take() {
                            handler.on_stop();
                        }
                        drop(state);
                        self.forget(token);
                        return;
                    }
                }
                state.generation = state.generation.wrapping_add(1) % FORCED;
                if let Some(deadline) = wait.deadline {
                    let generation = state.generation;
                    drop(state);
                    self.set_timer(deadline, token, generation);
                }
            }
        }
    }

    fn forget(&self, token: u64) {
        self.inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&token);
    }

    /// After stop: every source still registered is told and dropped (the last worker to
    /// get here finds the map empty).
    fn drop_sources(&self) {
        let entries: Vec<Arc<Entry>> = self
            .inner
            .sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, entry)| entry)
            .collect();
        for entry in entries {
            let mut state = entry.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(mut handler) = state.handler.take() {
                handler.on_stop();
            }
        }
    }
}

/// A listening UNIX socket as a source: each connection accepted is handed to `accept`, which
/// registers what serves it (or drops it to refuse it). The socket is made non-blocking.
pub struct Listener<F> {
    listener: std::os::unix::net::UnixListener,
    accept: F,
}

impl<F> Listener<F>
where
    F: FnMut(&Context<'_>, std::os::unix::net::UnixStream) + Send,
{
    /// A source accepting on `listener` (made non-blocking) and handing each connection to
    /// `accept`.
    pub fn new(listener: std::os::unix::net::UnixListener, accept: F) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self { listener, accept })
    }
}

impl<F> std::fmt::Debug for Listener<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Connections one [`Listener`] call accepts at most (the rest wait for the next turn).
const ACCEPTS_PER_CALL: usize = 64;

impl<F> Handler for Listener<F>
where
    F: FnMut(&Context<'_>, std::os::unix::net::UnixStream) + Send,
{
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.listener.as_fd())
    }

    fn on_event(&mut self, cx: &Context<'_>, _: Ready) -> Next {
        for _ in 0..ACCEPTS_PER_CALL {
            match self.listener.accept() {
                Ok((stream, _)) => (self.accept)(cx, stream),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                // WouldBlock: all taken. Anything else (EMFILE, ECONNABORTED) is about one
                // connection or a passing shortage: try again at the next readiness.
                Err(_) => break,
            }
        }
        Next::Wait(Wait::readable())
    }
}

/// A vfio-user connection as a source: a [`ServerConnection`] and the device it serves.
/// When the connection ends (or the reactor stops), `closed` gets the device back with the
/// reason (`None` when the reactor stopped first).
///
/// [`ServerConnection`]: iopf_vfio_user::ServerConnection
pub struct VfioUserSource<D, C>
where
    D: iopf_vfio_user::VfioUserDevice + Send,
    C: FnOnce(D, Option<Result<iopf_vfio_user::Disconnect, iopf_vfio_user::ServerError>>) + Send,
{
    conn: iopf_vfio_user::ServerConnection,
    /// The device and the callback, until the connection ends.
    device: Option<(D, C)>,
}

impl<D, C> VfioUserSource<D, C>
where
    D: iopf_vfio_user::VfioUserDevice + Send,
    C: FnOnce(D, Option<Result<iopf_vfio_user::Disconnect, iopf_vfio_user::ServerError>>) + Send,
{
    /// Serves `device` on `stream` under `server`; `closed` runs once at the end.
    pub fn new(
        stream: std::os::unix::net::UnixStream,
        server: iopf_vfio_user::Server,
        device: D,
        closed: C,
    ) -> Result<Self, iopf_vfio_user::ServerError> {
        Ok(Self {
            conn: iopf_vfio_user::ServerConnection::new(stream, server)?,
            device: Some((device, closed)),
        })
    }

    /// What to register it with: the socket readable.
    pub fn wait(&self) -> Wait {
        Wait::readable()
    }
}

impl<D, C> std::fmt::Debug for VfioUserSource<D, C>
where
    D: iopf_vfio_user::VfioUserDevice + Send,
    C: FnOnce(D, Option<Result<iopf_vfio_user::Disconnect, iopf_vfio_user::ServerError>>) + Send,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserSource")
            .field("conn", &self.conn)
            .field("open", &self.device.is_some())
            .finish()
    }
}

impl<D, C> Handler for VfioUserSource<D, C>
where
    D: iopf_vfio_user::VfioUserDevice + Send,
    C: FnOnce(D, Option<Result<iopf_vfio_user::Disconnect, iopf_vfio_user::ServerError>>) + Send,
{
    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.conn.stream().as_fd())
    }

    fn on_event(&mut self, cx: &Context<'_>, _: Ready) -> Next {
        let Some((device, _)) = self.device.as_mut() else {
            return Next::Remove;
        };
        let ended = match self.conn.drive(device, cx.now()) {
            Ok(iopf_vfio_user::Status::Open {
                want_write,
                deadline,
            }) => {
                return Next::Wait(Wait::readable().writable_if(want_write).until_opt(deadline));
            }
            Ok(iopf_vfio_user::Status::Closed(reason)) => Ok(reason),
            Ok(_) => Ok(iopf_vfio_user::Disconnect::Closed),
            Err(error) => Err(error),
        };
        if let Some((device, closed)) = self.device.take() {
            closed(device, Some(ended));
        }
        Next::Remove
    }

    fn on_stop(&mut self) {
        self.conn.shutdown();
        if let Some((device, closed)) = self.device.take() {
            closed(device, None);
        }
    }
}

impl AsFd for Reactor {
    /// The epoll set's fd (readable when a source is ready: to nest this reactor in another
    /// loop).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.epoll.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iopf_queue::Doorbell;
    use std::sync::atomic::AtomicUsize;

    struct Bell {
        bell: Doorbell,
        count: Arc<AtomicUsize>,
        timeouts: Arc<AtomicUsize>,
        running: Arc<AtomicUsize>,
        overlap: Arc<AtomicBool>,
    }

    impl Handler for Bell {
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            Some(self.bell.as_fd())
        }

        fn on_event(&mut self, cx: &Context<'_>, ready: Ready) -> Next {
            if self.running.fetch_add(1, Ordering::SeqCst) > 0 {
                self.overlap.store(true, Ordering::SeqCst);
            }
            let rang = self.bell.drain().unwrap() as usize;
            self.count.fetch_add(rang, Ordering::SeqCst);
            if ready.deadline {
                self.timeouts.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_micros(50));
            self.running.fetch_sub(1, Ordering::SeqCst);
            Next::Wait(Wait::readable().until(cx.now() + Duration::from_millis(1)))
        }
    }

    #[test]
    fn many_sources_on_two_threads_each_run_by_one_worker_at_a_time() {
        let reactor = Reactor::new().unwrap();
        let workers = reactor.spawn_workers(2).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let timeouts = Arc::new(AtomicUsize::new(0));
        let overlap = Arc::new(AtomicBool::new(false));
        let mut rings = Vec::new();
        for _ in 0..200 {
            let bell = Doorbell::new().unwrap();
            rings.push(bell.try_clone().unwrap());
            reactor
                .register(
                    Box::new(Bell {
                        bell,
                        count: count.clone(),
                        timeouts: timeouts.clone(),
                        running: Arc::new(AtomicUsize::new(0)),
                        overlap: overlap.clone(),
                    }),
                    Wait::readable(),
                )
                .unwrap();
        }
        for _ in 0..5 {
            for ring in &rings {
                ring.ring().unwrap();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while count.load(Ordering::SeqCst) < 200 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(count.load(Ordering::SeqCst) >= 200);
        assert!(timeouts.load(Ordering::SeqCst) > 0, "deadlines fire");
        assert!(
            !overlap.load(Ordering::SeqCst),
            "a source ran on two workers at once"
        );
        assert_eq!(reactor.len(), 200);
        reactor.stop();
        workers.join();
        assert_eq!(reactor.len(), 0);
    }

    struct Once(Arc<AtomicUsize>);

    impl Handler for Once {
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }

        fn on_event(&mut self, _: &Context<'_>, ready: Ready) -> Next {
            assert!(ready.deadline);
            self.0.fetch_add(1, Ordering::SeqCst);
            Next::Remove
        }
    }

    #[test]
    fn a_timer_source_runs_at_its_deadline_and_a_wake_runs_it_early() {
        let reactor = Reactor::new().unwrap();
        let workers = reactor.spawn_workers(1).unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let far = Instant::now() + Duration::from_secs(3600);
        let id = reactor
            .register(Box::new(Once(ran.clone())), Wait::at(far))
            .unwrap();
        reactor
            .register(Box::new(Once(ran.clone())), Wait::at(Instant::now()))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while ran.load(Ordering::SeqCst) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            1,
            "the due timer ran, the far one not"
        );
        reactor.wake(id);
        while ran.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(ran.load(Ordering::SeqCst), 2);
        assert!(reactor.is_empty());
        reactor.stop();
        workers.join();
    }

    /// The smallest device: no regions, no IRQs.
    struct Empty;

    impl iopf_vfio_user::VfioUserDevice for Empty {
        fn device_info(&self) -> iopf_vfio_user::DeviceInfo {
            iopf_vfio_user::DeviceInfo {
                flags: iopf_vfio_user::DeviceFlags::empty(),
                num_regions: 0,
                num_irqs: 0,
            }
        }
        fn region_info(&self, _: u32) -> Option<iopf_vfio_user::RegionInfo> {
            None
        }
        fn region_fd(&self, _: u32) -> Option<BorrowedFd<'_>> {
            None
        }
        fn irq_info(&self, _: u32) -> Option<iopf_vfio_user::IrqInfo> {
            None
        }
        fn region_read(
            &mut self,
            _: u32,
            _: u64,
            _: &mut [u8],
        ) -> Result<(), iopf_vfio_user::Errno> {
            Err(iopf_vfio_user::Errno::EINVAL)
        }
        fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), iopf_vfio_user::Errno> {
            Err(iopf_vfio_user::Errno::EINVAL)
        }
        fn set_irqs(&mut self, _: iopf_vfio_user::SetIrqs) -> Result<(), iopf_vfio_user::Errno> {
            Err(iopf_vfio_user::Errno::EINVAL)
        }
    }

    #[test]
    fn one_worker_serves_a_hundred_vfio_user_connections_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reactor.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let reactor = Reactor::new().unwrap();
        let workers = reactor.spawn_workers(1).unwrap();
        let closed = Arc::new(AtomicUsize::new(0));
        let on_close = closed.clone();
        let accept = Listener::new(listener, move |cx: &Context<'_>, stream| {
            let on_close = on_close.clone();
            let source = VfioUserSource::new(
                stream,
                iopf_vfio_user::Server::default(),
                Empty,
                move |_, reason| {
                    assert!(matches!(
                        reason,
                        Some(Ok(iopf_vfio_user::Disconnect::Closed))
                    ));
                    on_close.fetch_add(1, Ordering::SeqCst);
                },
            )
            .unwrap();
            let wait = source.wait();
            cx.reactor().register(Box::new(source), wait).unwrap();
        })
        .unwrap();
        reactor
            .register(Box::new(accept), Wait::readable())
            .unwrap();
        // Every client connected and negotiated before any is done: all are open at once on
        // the one worker.
        let mut clients: Vec<iopf_vfio_user::Client> = (0..100)
            .map(|_| iopf_vfio_user::Client::connect(&path).unwrap())
            .collect();
        for _ in 0..3 {
            for client in &mut clients {
                assert_eq!(client.device_info().unwrap().num_regions, 0);
            }
        }
        assert_eq!(reactor.len(), 101);
        for client in clients {
            client.close();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while closed.load(Ordering::SeqCst) < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(closed.load(Ordering::SeqCst), 100);
        assert_eq!(reactor.len(), 1, "only the listener is left");
        reactor.stop();
        workers.join();
    }

    /// Watches `bells[0]`, then after its first ring `bells[1]` (giving the first up).
    struct Switcher {
        bells: Vec<Doorbell>,
        calls: Arc<AtomicUsize>,
    }

    impl Handler for Switcher {
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            self.bells.first().map(AsFd::as_fd)
        }

        fn on_event(&mut self, cx: &Context<'_>, _: Ready) -> Next {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let first = self.bells.remove(0);
            first.drain().unwrap();
            if !self.bells.is_empty() {
                cx.unwatch(first.as_fd());
            } else {
                self.bells.push(first);
            }
            Next::Wait(Wait::readable())
        }
    }

    #[test]
    fn a_source_may_change_its_fd() {
        let reactor = Reactor::new().unwrap();
        let workers = reactor.spawn_workers(1).unwrap();
        let (a, b) = (Doorbell::new().unwrap(), Doorbell::new().unwrap());
        let (ring_a, ring_b) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let switcher = Switcher {
            bells: vec![a, b],
            calls: calls.clone(),
        };
        reactor
            .register(Box::new(switcher), Wait::readable())
            .unwrap();
        let wait_for = |n: usize| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while calls.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        ring_a.ring().unwrap();
        wait_for(1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The old fd is no longer watched (its open file lives on in `ring_a`).
        ring_a.ring().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        ring_b.ring().unwrap();
        wait_for(2);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        reactor.stop();
        workers.join();
    }

    /// Always asks to run again at once.
    struct Busy;

    impl Handler for Busy {
        fn fd(&self) -> Option<BorrowedFd<'_>> {
            None
        }

        fn on_event(&mut self, cx: &Context<'_>, _: Ready) -> Next {
            Next::Wait(Wait::at(cx.now()))
        }
    }

    #[test]
    fn sources_that_always_run_again_do_not_starve_an_fd() {
        let reactor = Reactor::new().unwrap();
        let workers = reactor.spawn_workers(1).unwrap();
        for _ in 0..8 {
            reactor
                .register(Box::new(Busy), Wait::at(Instant::now()))
                .unwrap();
        }
        let bell = Doorbell::new().unwrap();
        let ring = bell.try_clone().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        reactor
            .register(
                Box::new(Bell {
                    bell,
                    count: count.clone(),
                    timeouts: Arc::new(AtomicUsize::new(0)),
                    running: Arc::new(AtomicUsize::new(0)),
                    overlap: Arc::new(AtomicBool::new(false)),
                }),
                Wait::readable(),
            )
            .unwrap();
        ring.ring().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while count.load(Ordering::SeqCst) < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "the doorbell was never served"
        );
        reactor.stop();
        workers.join();
    }
}
