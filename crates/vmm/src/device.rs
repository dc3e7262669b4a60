//! One device as the VMM serves it: its fault channel, the groups being assembled, and the
//! outbox of answers the [`Responder`] fills.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use iopf_abi::{Fault, PageResponse, ResponseCode, ResponseRecord};
use iopf_queue::{ChannelError, ChannelFault, Doorbell, FaultChannel, SharedMemoryChannel};
use rustix::event::{PollFd, PollFlags, Timespec};
use thiserror::Error;

use crate::viommu::{Assembled, GroupAssembler, GroupToken, PageRequestGroup, Viommu};

/// Fault records one [`Device::poll`] reads at most (an event loop serving many devices polls a
/// busy one again rather than letting it hold the thread).
pub const READ_BATCH: usize = 1024;

/// Answers an outbox holds at most; beyond, [`Responder::respond`] refuses with
/// [`RespondError::Full`]. The host bounds the groups it has pending, so an honest peer never
/// gets near it; a host that stops reading responses does.
pub const OUTBOX_LIMIT: usize = 65_536;

/// How long a loop sleeps at most while answers wait for room in the response ring (the host
/// rings no doorbell when it frees room).
pub const BACKLOG_RETRY: Duration = Duration::from_millis(1);

/// Numbers of `Device`s, so that a token is only ever answered through its own device.
static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// What went wrong serving a device.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VmmError {
    /// The fault channel failed (the host broke a queue, or the kernel's file failed).
    #[error("fault channel")]
    Channel(#[from] ChannelError),
    /// The device's own wake-up eventfd failed.
    #[error("cannot create, drain or poll the device's wake-up eventfd")]
    Wake(#[source] io::Error),
    /// An event loop could not watch the fd of the device's new channel.
    #[error("cannot add the new channel's fd to the event loop's epoll set")]
    Watch(#[source] io::Error),
}

/// Why an answer was not queued.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RespondError {
    /// The group came in an earlier handler life (the channel was replaced since): its cookie
    /// means nothing to the new life, so the answer is dropped here, and counted in
    /// [`DeviceStats::stale_answers`].
    #[error("the group came in an earlier handler life; the answer is dropped")]
    StaleLife,
    /// The token belongs to another [`Device`].
    #[error("the group came from another device's channel")]
    OtherDevice,
    /// The device was dropped.
    #[error("the device is gone")]
    Closed,
    /// [`OUTBOX_LIMIT`] answers wait already (the host does not read them).
    #[error("{OUTBOX_LIMIT} answers wait already; the answer is dropped")]
    Full,
    /// The device's wake-up eventfd could not be rung.
    #[error("cannot ring the device's wake-up eventfd")]
    Wake(#[source] io::Error),
}

/// What a device counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Page requests read.
    pub requests: u64,
    /// Whole groups handed to the [`Viommu`].
    pub groups: u64,
    /// Unrecoverable faults read.
    pub unrecoverable: u64,
    /// Records that did not decode (an honest host writes none).
    pub malformed: u64,
    /// Responses the channel took.
    pub responses: u64,
    /// Answers dropped here because their group came in an earlier handler life.
    pub stale_answers: u64,
    /// Answers refused because the outbox was full.
    pub outbox_full: u64,
    /// Partial groups dropped (too long, interrupted, or cut off by a new handler life).
    pub partial_groups_dropped: u64,
    /// Of those, groups too long whose last request arrived: answered `Invalid` here.
    pub oversized_answered: u64,
}

#[derive(Debug, Default)]
struct Outbox {
    life: u64,
    queue: VecDeque<ResponseRecord>,
    /// The device is inside `poll` and flushes before it returns: no wake-up needed.
    polling: bool,
    closed: bool,
    stale: u64,
    full: u64,
}

#[derive(Debug)]
struct Shared {
    owner: u64,
    outbox: Mutex<Outbox>,
    /// Rung when an answer is queued from outside `poll`, so the loop flushes it.
    wake: Doorbell,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Outbox> {
        // The outbox is a queue and counters, consistent after every statement: a panic
        // elsewhere while it was locked leaves nothing half done.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Answers page request groups of one [`Device`], from any thread.
///
/// Answers go into the device's outbox and are sent by the device's next
/// [`poll`](Device::poll) or [`flush`](Device::flush). An answer given outside `poll` (from
/// another thread, or after a timer) rings the device's [wake fd](Device::wake_fd), which an
/// [`EventLoop`](crate::EventLoop) watches, so the loop wakes and sends it; a VMM that drives
/// a `Device` itself must watch that fd too (as [`Device::wait`] does).
#[derive(Debug, Clone)]
pub struct Responder {
    shared: Arc<Shared>,
}

impl Responder {
    /// Answers the group of `token` with `code`.
    ///
    /// # Errors
    ///
    /// [`RespondError::StaleLife`] if the group came in an earlier handler life (the answer
    /// is dropped and counted); [`RespondError::OtherDevice`] if the token is another
    /// device's; [`RespondError::Closed`] if the device is gone; [`RespondError::Full`] if
    /// the host does not read answers; [`RespondError::Wake`] if the loop could not be woken
    /// (the answer is queued, and goes out at the device's next poll).
    pub fn respond(&self, token: GroupToken, code: ResponseCode) -> Result<(), RespondError> {
        let record = ResponseRecord::from(&PageResponse::answering(&token.last, code));
        self.push(Some(&token), record)
    }

    /// Sends `record`, as is, for the group of `token`, with the same checks as
    /// [`respond`](Self::respond). For guest models and tools that must send what a host
    /// should refuse (a duplicate, a forged cookie); a VMM answers with `respond`.
    pub fn respond_record(
        &self,
        token: GroupToken,
        record: ResponseRecord,
    ) -> Result<(), RespondError> {
        self.push(Some(&token), record)
    }

    /// Sends `record`, as is, into the current handler life, without any check: for test
    /// tools that model a VMM sending late answers across handler lives (which the host must
    /// refuse). A VMM never needs it.
    pub fn respond_unchecked(&self, record: ResponseRecord) -> Result<(), RespondError> {
        self.push(None, record)
    }

    fn push(&self, token: Option<&GroupToken>, record: ResponseRecord) -> Result<(), RespondError> {
        let wake = {
            let mut o = self.shared.lock();
            if o.closed {
                return Err(RespondError::Closed);
            }
            if let Some(token) = token {
                if token.owner != self.shared.owner {
                    return Err(RespondError::OtherDevice);
                }
                if token.life != o.life {
                    o.stale += 1;
                    return Err(RespondError::StaleLife);
                }
            }
            if o.queue.len() >= OUTBOX_LIMIT {
                o.full += 1;
                return Err(RespondError::Full);
            }
            let was_empty = o.queue.is_empty();
            o.queue.push_back(record);
            // Inside `poll`, the flush that ends it sends this; a non-empty queue outside
            // `poll` already woke the loop, or waits for ring room on the loop's retry timer.
            !o.polling && was_empty
        };
        if wake {
            self.shared.wake.ring().map_err(RespondError::Wake)?;
        }
        Ok(())
    }
}

/// A device's fault channel, served for a [`Viommu`].
///
/// The channel is any [`FaultChannel`]: the shared-memory queues of an iopf host (the
/// default) or the kernel's iommufd fault queue.
#[derive(Debug)]
pub struct Device<C: FaultChannel = SharedMemoryChannel> {
    channel: C,
    shared: Arc<Shared>,
    assembler: GroupAssembler,
    life: u64,
    stats: DeviceStats,
    faults: Vec<ChannelFault>,
}

impl<C: FaultChannel> Device<C> {
    /// Serves `channel`.
    ///
    /// # Errors
    ///
    /// [`VmmError::Wake`] if the device's wake-up eventfd cannot be created.
    pub fn new(channel: C) -> Result<Self, VmmError> {
        Ok(Self {
            channel,
            shared: Arc::new(Shared {
                owner: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
                outbox: Mutex::new(Outbox::default()),
                wake: Doorbell::new().map_err(VmmError::Wake)?,
            }),
            assembler: GroupAssembler::new(),
            life: 0,
            stats: DeviceStats::default(),
            faults: Vec::new(),
        })
    }

    /// Answers this device's groups, from any thread.
    pub fn responder(&self) -> Responder {
        Responder {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Reads the faults that are ready (at most [`READ_BATCH`] records), hands whole groups,
    /// unrecoverable faults and undecodable records to `viommu`, then sends the answers
    /// queued so far. Returns the records read.
    pub fn poll<V: Viommu + ?Sized>(&mut self, viommu: &mut V) -> Result<usize, VmmError> {
        self.shared.lock().polling = true;
        let mut faults = std::mem::take(&mut self.faults);
        faults.clear();
        let read = self.channel.read(READ_BATCH, &mut |f| faults.push(f));
        let read = match read {
            Ok(n) => n,
            Err(e) => {
                self.shared.lock().polling = false;
                self.faults = faults;
                return Err(e.into());
            }
        };
        for ChannelFault { device, fault } in faults.drain(..) {
            match fault {
                Ok(Fault::PageRequest(request)) => {
                    self.stats.requests += 1;
                    match self.assembler.push(device, request) {
                        Assembled::Partial => {}
                        Assembled::Group(requests) => {
                            self.stats.groups += 1;
                            let owner = self.shared.owner;
                            viommu.page_request_group(PageRequestGroup::new(
                                device, requests, owner, self.life,
                            ));
                        }
                        Assembled::DroppedLast(last) => {
                            self.stats.oversized_answered += 1;
                            let record = PageResponse::answering(&last, ResponseCode::Invalid);
                            self.shared.lock().queue.push_back((&record).into());
                        }
                    }
                }
                Ok(Fault::Unrecoverable(fault)) => {
                    self.stats.unrecoverable += 1;
                    viommu.unrecoverable(device, fault);
                }
                Err(error) => {
                    self.stats.malformed += 1;
                    viommu.malformed(device, error);
                }
            }
        }
        self.faults = faults;
        self.flush()?;
        Ok(read)
    }

    /// Sends the answers queued, in order, as far as the response ring takes them; the rest
    /// stay queued, in order, for the next poll or flush. Returns how many were sent.
    pub fn flush(&mut self) -> Result<usize, VmmError> {
        let mut batch = {
            let mut o = self.shared.lock();
            o.polling = false;
            std::mem::take(&mut o.queue)
        };
        if batch.is_empty() {
            return Ok(0);
        }
        let sent = self.channel.respond(batch.make_contiguous());
        let taken = *sent.as_ref().unwrap_or(&0);
        self.stats.responses += taken as u64;
        if taken < batch.len() {
            // Back in front of anything queued meanwhile, in order.
            let mut o = self.shared.lock();
            for record in batch.drain(taken..).rev() {
                o.queue.push_front(record);
            }
        }
        Ok(sent?)
    }

    /// Answers queued and not yet sent (waiting for room in the response ring).
    pub fn backlog(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// The channel's fd to sleep on (see [`FaultChannel::poll_fd`]).
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.channel.poll_fd()
    }

    /// The eventfd a [`Responder`] rings when it queues an answer outside `poll`: sleep on it
    /// too, and [`flush`](Self::flush) (or poll) when it fires.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.shared.wake.as_fd()
    }

    /// Asks for a wake-up before sleeping (see [`FaultChannel::prepare_to_sleep`]): `true`
    /// if nothing is ready and it is safe to sleep on [`poll_fd`](Self::poll_fd) and
    /// [`wake_fd`](Self::wake_fd).
    pub fn prepare_to_sleep(&mut self) -> Result<bool, VmmError> {
        Ok(self.channel.prepare_to_sleep()?)
    }

    /// After a sleep: withdraws the wake-up request and drains both fds, without blocking.
    pub fn woke(&mut self) -> Result<(), VmmError> {
        self.woke_fired(true, true)
    }

    /// [`woke`](Self::woke) for a loop that knows which fds fired: drains only those (a
    /// read of an empty eventfd is a system call for nothing).
    pub(crate) fn woke_fired(&mut self, channel: bool, wake: bool) -> Result<(), VmmError> {
        if channel {
            self.channel.woke()?;
        }
        if wake {
            self.shared.wake.drain().map_err(VmmError::Wake)?;
        }
        Ok(())
    }

    /// For a VMM that serves this one device on its own thread: sleeps until faults may be
    /// ready, an answer is queued from elsewhere, or `timeout` passes (at most
    /// [`BACKLOG_RETRY`] while answers wait for ring room). Follows the wake-up protocol: no
    /// wake-up is lost.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), VmmError> {
        if !self.prepare_to_sleep()? {
            return Ok(());
        }
        let timeout = if self.backlog() > 0 {
            timeout.min(BACKLOG_RETRY)
        } else {
            timeout
        };
        let slept = {
            let channel_fd = self.channel.poll_fd();
            let mut fds = [
                PollFd::new(&channel_fd, PollFlags::IN),
                PollFd::new(&self.shared.wake, PollFlags::IN),
            ];
            let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => Ok(()),
                Err(e) => Err(VmmError::Channel(ChannelError::Io {
                    what: "poll of the device's fds",
                    source: e.into(),
                })),
            }
        };
        self.woke()?;
        slept
    }

    /// Whether the other side says faults may still come.
    pub fn live(&self) -> bool {
        self.channel.live()
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        let o = self.shared.lock();
        DeviceStats {
            stale_answers: o.stale,
            outbox_full: o.full,
            partial_groups_dropped: self.assembler.dropped_groups(),
            ..self.stats
        }
    }

    /// The handler life: 0 for the first channel, one more at each
    /// [`replace_channel`](Self::replace_channel).
    pub fn life(&self) -> u64 {
        self.life
    }

    /// Takes the channel of a new handler life and returns the old one. Answers queued for
    /// the earlier life, and those given later with its tokens, are dropped here and counted
    /// in [`DeviceStats::stale_answers`]; unfinished groups are dropped.
    ///
    /// A device in an [`EventLoop`](crate::EventLoop) has its channel replaced through
    /// [`EventLoop::replace_channel`](crate::EventLoop::replace_channel), which moves the
    /// loop's watch to the new fd.
    pub fn replace_channel(&mut self, channel: C) -> C {
        {
            let mut o = self.shared.lock();
            o.life += 1;
            o.stale += o.queue.len() as u64;
            o.queue.clear();
            self.life = o.life;
        }
        self.assembler.clear();
        std::mem::replace(&mut self.channel, channel)
    }

    /// The fault channel.
    pub fn channel(&self) -> &C {
        &self.channel
    }

    /// The fault channel, mutably (reading or answering through it bypasses the device).
    pub fn channel_mut(&mut self) -> &mut C {
        &mut self.channel
    }
}

impl<C: FaultChannel> Drop for Device<C> {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
    }
}
