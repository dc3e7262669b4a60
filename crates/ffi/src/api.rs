//! What each entry point does, in safe Rust: the handle registry, attaching, the loop steps,
//! draining into the caller's buffers and answering by cookie. `raw.rs` only turns C
//! arguments into the Rust values these functions take.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::c_int;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iopf_abi::{ResponseCode, UnrecoverableFault};
use iopf_queue::{Doorbell, SharedMemoryChannel};
use iopf_vfio_user::{Client, ClientError, DmaProt};
use iopf_vmm::{Device, GroupToken, PageRequestGroup, Responder, Viommu, attach_channel};
use rustix::event::epoll;

use crate::error::FfiError;
use crate::types::{
    IOPF_GROUP_PASID_VALID, IOPF_MAX_GROUP_REQUESTS, iopf_device, iopf_group, iopf_page_request,
    iopf_stats, iopf_unrecoverable,
};

/// Faults read and not yet drained, at most: beyond, `iopf_poll` reads nothing more (a
/// caller that never drains does not make the library grow without bound).
pub(crate) const UNDRAINED_LIMIT: usize = 65_536;

/// Groups handed out and not answered, at most: beyond, the library answers the next group
/// Invalid itself instead of handing it out (an honest host never has that many pending).
pub(crate) const AWAITING_LIMIT: usize = 65_536;

/// Entries one buffer may be said to hold, at most (a larger length is a caller's bug, and
/// `slice::from_raw_parts` needs the byte size to fit an `isize`).
pub(crate) const BUFFER_LIMIT: usize = 1 << 24;

/// Handles carry this tag in their top 16 bits, so a small integer (an fd, a count, a
/// truncated pointer) is never taken for one.
const HANDLE_TAG: u64 = 0x10f0 << 48;
const HANDLE_COUNTER: u64 = (1 << 48) - 1;

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);
static REGISTRY: Mutex<BTreeMap<u64, Arc<Handle>>> = Mutex::new(BTreeMap::new());

fn registry() -> MutexGuard<'static, BTreeMap<u64, Arc<Handle>>> {
    // The map is consistent after every insert and remove: a panic elsewhere while it was
    // held leaves nothing half done.
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// An attached device: the part the polling thread uses, and the part any thread answers
/// through (so an answer never waits for a poll).
#[derive(Debug)]
pub(crate) struct Handle {
    state: Mutex<State>,
    answers: Mutex<Answers>,
}

#[derive(Debug)]
struct State {
    device: Device,
    /// The vfio-user connection, if attached over a socket (dropping it is unregistering).
    client: Option<Client>,
    /// An epoll set over the device's fault fd and wake fd: the one fd the caller watches.
    epoll: OwnedFd,
    groups: VecDeque<PageRequestGroup>,
    unrecoverable: VecDeque<(u32, UnrecoverableFault)>,
}

#[derive(Debug)]
struct Answers {
    responder: Responder,
    next_cookie: u64,
    awaiting: HashMap<u64, GroupToken>,
    overflow_answered: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> Result<MutexGuard<'_, T>, FfiError> {
    mutex.lock().map_err(|_| FfiError::Poisoned)
}

/// The handle registered as `handle`.
fn find(handle: iopf_device) -> Result<Arc<Handle>, FfiError> {
    registry()
        .get(&handle)
        .cloned()
        .ok_or(FfiError::BadHandle(handle))
}

fn io(what: &'static str) -> impl FnOnce(rustix::io::Errno) -> FfiError {
    move |e| FfiError::Io {
        what,
        source: e.into(),
    }
}

/// Registers `device` (and its connection) and returns its new handle.
fn register(device: Device, client: Option<Client>) -> Result<iopf_device, FfiError> {
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(io("epoll_create"))?;
    for (fd, n) in [(device.poll_fd(), 0), (device.wake_fd(), 1)] {
        epoll::add(
            &epoll,
            fd,
            epoll::EventData::new_u64(n),
            epoll::EventFlags::IN,
        )
        .map_err(io("adding the device's fds to its epoll set"))?;
    }
    let answers = Answers {
        responder: device.responder(),
        next_cookie: 1,
        awaiting: HashMap::new(),
        overflow_answered: 0,
    };
    let state = State {
        device,
        client,
        epoll,
        groups: VecDeque::new(),
        unrecoverable: VecDeque::new(),
    };
    let handle = Arc::new(Handle {
        state: Mutex::new(state),
        answers: Mutex::new(answers),
    });
    let n = NEXT_HANDLE.fetch_add(1, Ordering::Relaxed);
    if n > HANDLE_COUNTER {
        return Err(FfiError::Argument("no handles left in this process".into()));
    }
    let id = HANDLE_TAG | n;
    registry().insert(id, handle);
    Ok(id)
}

/// Attaches the device served on the vfio-user socket at `path`.
pub(crate) fn attach_socket(path: &Path) -> Result<iopf_device, FfiError> {
    let what = || format!("attaching the device on {}", path.display());
    let mut client = Client::connect(path).map_err(|e| match e {
        // An iopf host with every device taken closes new connections unread: the
        // handshake sees an end of stream or a reset.
        ClientError::Closed | ClientError::Connection(_) => FfiError::Refused {
            path: path.display().to_string(),
            source: e,
        },
        e => FfiError::Attach {
            what: what(),
            source: e.into(),
        },
    })?;
    let channel = attach_channel(&mut client).map_err(|source| FfiError::Attach {
        what: what(),
        source,
    })?;
    let device = Device::new(channel).map_err(|source| FfiError::Device {
        what: "creating the device's wake-up eventfd",
        source,
    })?;
    register(device, Some(client))
}

/// Attaches a device from the fds the caller holds (duplicates, owned here from now on).
pub(crate) fn attach_fds(
    device: u32,
    fault_region: OwnedFd,
    response_region: OwnedFd,
    fault_irq: OwnedFd,
    response_doorbell: Option<OwnedFd>,
) -> Result<iopf_device, FfiError> {
    let what = || format!("attaching device {device} from fds");
    let doorbell = |fd, which: &'static str| {
        Doorbell::from_fd(fd).map_err(|source| FfiError::Io {
            what: which,
            source,
        })
    };
    let fault_irq = doorbell(fault_irq, "the fault IRQ fd is not an eventfd")?;
    let response_doorbell = response_doorbell
        .map(|fd| doorbell(fd, "the response doorbell fd is not an eventfd"))
        .transpose()?;
    let channel = SharedMemoryChannel::from_fds(
        device,
        fault_region,
        response_region,
        fault_irq,
        response_doorbell,
    )
    .map_err(|e| FfiError::Attach {
        what: what(),
        source: e.into(),
    })?;
    let device = Device::new(channel).map_err(|source| FfiError::Device {
        what: "creating the device's wake-up eventfd",
        source,
    })?;
    register(device, None)
}

/// Detaches `handle`: its connection is closed (the host unregisters the device), its fds are
/// closed, its handle is never valid again.
pub(crate) fn detach(handle: iopf_device) -> Result<c_int, FfiError> {
    let removed = registry().remove(&handle);
    // Dropped outside the registry's lock: closing the connection is a system call.
    drop(removed.ok_or(FfiError::BadHandle(handle))?);
    Ok(0)
}

/// The host's number for the device.
pub(crate) fn device_number(handle: iopf_device) -> Result<u32, FfiError> {
    let h = find(handle)?;
    let state = lock(&h.state)?;
    Ok(state.device.channel().device())
}

/// The fd to watch for readability.
pub(crate) fn fd(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let state = lock(&h.state)?;
    Ok(state.epoll.as_raw_fd())
}

/// Collects what a poll reads, for the caller to drain.
struct Collect<'a> {
    groups: &'a mut VecDeque<PageRequestGroup>,
    unrecoverable: &'a mut VecDeque<(u32, UnrecoverableFault)>,
}

impl Viommu for Collect<'_> {
    fn page_request_group(&mut self, group: PageRequestGroup) {
        self.groups.push_back(group);
    }

    fn unrecoverable(&mut self, device: u32, fault: UnrecoverableFault) {
        self.unrecoverable.push_back((device, fault));
    }
}

/// Reads the faults that are ready and sends the answers queued; returns the records read.
pub(crate) fn poll(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    let state = &mut *state;
    let undrained = state.groups.len() + state.unrecoverable.len();
    if undrained >= UNDRAINED_LIMIT {
        flush_state(state)?;
        return Err(FfiError::Undrained(undrained));
    }
    let mut collect = Collect {
        groups: &mut state.groups,
        unrecoverable: &mut state.unrecoverable,
    };
    let read = (state.device.poll(&mut collect)).map_err(|source| FfiError::Device {
        what: "reading faults",
        source,
    })?;
    Ok(c_int::try_from(read).unwrap_or(c_int::MAX))
}

fn flush_state(state: &mut State) -> Result<c_int, FfiError> {
    let sent = state.device.flush().map_err(|source| FfiError::Device {
        what: "sending answers",
        source,
    })?;
    Ok(c_int::try_from(sent).unwrap_or(c_int::MAX))
}

/// Sends the answers queued; returns how many the response ring took.
pub(crate) fn flush(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    flush_state(&mut state)
}

/// 1 if it is safe to sleep on the fd, 0 if faults arrived meanwhile.
pub(crate) fn prepare_to_sleep(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    let sleep = (state.device.prepare_to_sleep()).map_err(|source| FfiError::Device {
        what: "asking the host for a wake-up",
        source,
    })?;
    Ok(c_int::from(sleep))
}

/// After a sleep: withdraws the wake-up request and drains the device's eventfds.
pub(crate) fn woke(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    (state.device.woke()).map_err(|source| FfiError::Device {
        what: "draining the device's eventfds",
        source,
    })?;
    Ok(0)
}

/// Answers queued and not yet taken by the response ring.
pub(crate) fn backlog(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let state = lock(&h.state)?;
    Ok(c_int::try_from(state.device.backlog()).unwrap_or(c_int::MAX))
}

/// 1 while the host says faults may still come, else 0.
pub(crate) fn live(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    let state = lock(&h.state)?;
    Ok(c_int::from(state.device.live()))
}

/// Moves whole groups into `groups` and their requests into `requests`; returns the groups
/// written.
pub(crate) fn drain_groups(
    handle: iopf_device,
    groups: &mut [MaybeUninit<iopf_group>],
    requests: &mut [MaybeUninit<iopf_page_request>],
) -> Result<c_int, FfiError> {
    if groups.is_empty() {
        return Err(FfiError::Argument(
            "the group buffer has room for no group".into(),
        ));
    }
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    let mut answers = lock(&h.answers)?;
    let (mut written, mut used) = (0, 0);
    while written < groups.len() {
        let Some(group) = state.groups.front() else {
            break;
        };
        let count = group.requests().len();
        if count > requests.len() - used {
            if written == 0 {
                return Err(FfiError::NoSpace {
                    needed: count,
                    room: requests.len(),
                });
            }
            break;
        }
        let Some(group) = state.groups.pop_front() else {
            break;
        };
        if answers.awaiting.len() >= AWAITING_LIMIT {
            // When it is refused (the host reads no answers), the host's response timeout
            // answers the group: it gets no other answer from here either way.
            let answered = answers
                .responder
                .respond(group.token(), ResponseCode::Invalid);
            if answered.is_ok() {
                answers.overflow_answered += 1;
            }
            continue;
        }
        let cookie = answers.next_cookie;
        answers.next_cookie += 1;
        answers.awaiting.insert(cookie, group.token());
        // Within `BUFFER_LIMIT` and `IOPF_MAX_GROUP_REQUESTS`: both fit a u32.
        let first = u32::try_from(used).unwrap_or(u32::MAX);
        let count32 = u32::try_from(count).unwrap_or(IOPF_MAX_GROUP_REQUESTS);
        for (slot, request) in requests[used..used + count]
            .iter_mut()
            .zip(group.requests())
        {
            slot.write(iopf_page_request::from_request(request));
        }
        used += count;
        groups[written].write(iopf_group {
            cookie,
            device: group.device(),
            flags: if group.pasid().is_some() {
                IOPF_GROUP_PASID_VALID
            } else {
                0
            },
            pasid: group.pasid().map_or(0, |p| p.get()),
            grpid: u32::from(group.grpid().get()),
            first,
            count: count32,
        });
        written += 1;
    }
    Ok(c_int::try_from(written).unwrap_or(c_int::MAX))
}

/// Moves unrecoverable faults into `faults`; returns how many.
pub(crate) fn drain_unrecoverable(
    handle: iopf_device,
    faults: &mut [MaybeUninit<iopf_unrecoverable>],
) -> Result<c_int, FfiError> {
    if faults.is_empty() {
        return Err(FfiError::Argument(
            "the fault buffer has room for no fault".into(),
        ));
    }
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    let mut written = 0;
    for slot in faults.iter_mut() {
        let Some((device, fault)) = state.unrecoverable.pop_front() else {
            break;
        };
        slot.write(iopf_unrecoverable::from_fault(device, &fault));
        written += 1;
    }
    Ok(written)
}

/// Answers the group handed out under `cookie` with `code`.
pub(crate) fn answer(handle: iopf_device, cookie: u64, code: u32) -> Result<c_int, FfiError> {
    let code = ResponseCode::from_raw(code)
        .map_err(|_| FfiError::Argument(format!("{code} is not an answer code (0, 1 or 2)")))?;
    let h = find(handle)?;
    let mut answers = lock(&h.answers)?;
    let token = answers
        .awaiting
        .remove(&cookie)
        .ok_or(FfiError::NoSuchCookie(cookie))?;
    match answers.responder.respond(token, code) {
        Ok(()) => Ok(0),
        Err(source) => {
            if matches!(source, iopf_vmm::RespondError::Full) {
                // Not queued: the caller may answer again once the host reads answers.
                answers.awaiting.insert(cookie, token);
            }
            Err(FfiError::Respond { cookie, source })
        }
    }
}

/// The device's counters.
pub(crate) fn stats(handle: iopf_device) -> Result<iopf_stats, FfiError> {
    let h = find(handle)?;
    let state = lock(&h.state)?;
    let answers = lock(&h.answers)?;
    let s = state.device.stats();
    Ok(iopf_stats {
        requests: s.requests,
        groups: s.groups,
        unrecoverable: s.unrecoverable,
        malformed: s.malformed,
        responses: s.responses,
        outbox_full: s.outbox_full,
        partial_groups_dropped: s.partial_groups_dropped,
        oversized_answered: s.oversized_answered,
        awaiting_answer: answers.awaiting.len() as u64,
        overflow_answered: answers.overflow_answered,
        backlog: state.device.backlog() as u64,
    })
}

/// Runs `f` on the handle's vfio-user connection.
fn with_client<T>(
    handle: iopf_device,
    f: impl FnOnce(&mut State, &mut Client) -> Result<T, FfiError>,
) -> Result<T, FfiError> {
    let h = find(handle)?;
    let mut state = lock(&h.state)?;
    let mut client = state.client.take().ok_or(FfiError::Unsupported(
        "the device was attached from fds: it has no vfio-user connection here",
    ))?;
    let result = f(&mut state, &mut client);
    state.client = Some(client);
    result
}

fn client_error(what: &'static str) -> impl FnOnce(iopf_vfio_user::ClientError) -> FfiError {
    move |source| FfiError::Client { what, source }
}

/// `DMA_MAP` of `len` bytes of `fd` from `offset` at IOVA `iova`.
pub(crate) fn dma_map(
    handle: iopf_device,
    fd: OwnedFd,
    offset: u64,
    iova: u64,
    len: u64,
    prot: u32,
) -> Result<c_int, FfiError> {
    let prot = DmaProt::from_bits(prot)
        .ok_or_else(|| FfiError::Argument(format!("{prot:#x} has unknown IOPF_DMA_* bits")))?;
    if len == 0 {
        return Err(FfiError::Argument("a DMA mapping of 0 bytes".into()));
    }
    with_client(handle, |_, client| {
        (client.dma_map(Some(fd.as_fd()), offset, iova, len, prot))
            .map_err(client_error("DMA_MAP"))?;
        Ok(0)
    })
}

/// `DMA_UNMAP` of the mapping at `iova` of `len` bytes.
pub(crate) fn dma_unmap(handle: iopf_device, iova: u64, len: u64) -> Result<c_int, FfiError> {
    with_client(handle, |_, client| {
        client
            .dma_unmap(iova, len)
            .map_err(client_error("DMA_UNMAP"))?;
        Ok(0)
    })
}

/// Writes the PASID directory registers.
pub(crate) fn set_pasid_directory(
    handle: iopf_device,
    base: u64,
    entries: u64,
) -> Result<c_int, FfiError> {
    with_client(handle, |_, client| {
        iopf_vmm::set_pasid_directory(client, base, entries).map_err(|source| {
            FfiError::Attach {
                what: "writing the PASID directory registers".into(),
                source,
            }
        })?;
        Ok(0)
    })
}

/// 1 if the host says it has finished, else 0.
pub(crate) fn host_finished(handle: iopf_device) -> Result<c_int, FfiError> {
    with_client(handle, |_, client| {
        let finished = iopf_vmm::host_finished(client).map_err(|source| FfiError::Attach {
            what: "reading the host state register".into(),
            source,
        })?;
        Ok(c_int::from(finished))
    })
}

/// `DEVICE_RESET`; the groups handed out or read before it are forgotten.
pub(crate) fn reset(handle: iopf_device) -> Result<c_int, FfiError> {
    let h = find(handle)?;
    with_client(handle, |state, client| {
        client.reset().map_err(client_error("DEVICE_RESET"))?;
        // The host answered every pending group Invalid: their cookies mean nothing now.
        state.groups.clear();
        lock(&h.answers)?.awaiting.clear();
        Ok(0)
    })
}
