/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * libiopf: the VMM side of iopf for C VMMs. Attach a device over vfio-user (or from the fds
 * you hold), watch one fd per device from your event loop, drain whole page request groups
 * and unrecoverable faults, answer each group by its cookie. docs/C-API.md is the guide.
 *
 * Link with `pkg-config --cflags --libs iopf`. Every function returns a negative errno value
 * on failure (and iopf_last_error() describes it); handles are numbers, never pointers.
 * Requires C99 or C++98.
 */

#ifndef IOPF_H
#define IOPF_H

/* Generated from crates/ffi by cbindgen (scripts/c-header): do not edit by hand. */

#include <stddef.h>
#include <stdint.h>

/**
 * Answer code: the page is mapped now, the device retries the access.
 */
#define IOPF_ANSWER_SUCCESS 0

/**
 * Answer code: the request cannot be satisfied, the device fails that access.
 */
#define IOPF_ANSWER_INVALID 1

/**
 * Answer code: the device stops issuing page requests until PRI is reset (almost never the
 * right answer; an iopf host refuses it unless configured to allow it).
 */
#define IOPF_ANSWER_FAILURE 2

/**
 * Access permission bit of a faulting access: read.
 */
#define IOPF_PERM_READ (1 << 0)

/**
 * Access permission bit of a faulting access: write.
 */
#define IOPF_PERM_WRITE (1 << 1)

/**
 * Access permission bit of a faulting access: instruction fetch.
 */
#define IOPF_PERM_EXEC (1 << 2)

/**
 * Access permission bit of a faulting access: privileged (supervisor).
 */
#define IOPF_PERM_PRIV (1 << 3)

/**
 * `iopf_group.flags`: `pasid` is valid (the group's requests carried a PASID).
 */
#define IOPF_GROUP_PASID_VALID (1 << 0)

/**
 * `iopf_page_request.flags`: the last request of its group.
 */
#define IOPF_REQUEST_LAST (1 << 0)

/**
 * `iopf_page_request.flags`: `private_data` is valid.
 */
#define IOPF_REQUEST_PRIV_DATA_VALID (1 << 1)

/**
 * `iopf_unrecoverable.flags`: `pasid` is valid.
 */
#define IOPF_UNRECOVERABLE_PASID_VALID (1 << 0)

/**
 * `iopf_unrecoverable.flags`: `addr` is valid.
 */
#define IOPF_UNRECOVERABLE_ADDR_VALID (1 << 1)

/**
 * `iopf_unrecoverable.flags`: `fetch_addr` is valid.
 */
#define IOPF_UNRECOVERABLE_FETCH_ADDR_VALID (1 << 2)

/**
 * `iopf_unrecoverable.reason`: no reason given.
 */
#define IOPF_REASON_UNKNOWN 0

/**
 * `iopf_unrecoverable.reason`: could not fetch the PASID table entry.
 */
#define IOPF_REASON_PASID_FETCH 1

/**
 * `iopf_unrecoverable.reason`: the PASID table entry is invalid or malformed.
 */
#define IOPF_REASON_BAD_PASID_ENTRY 2

/**
 * `iopf_unrecoverable.reason`: the PASID is out of range or disabled.
 */
#define IOPF_REASON_PASID_INVALID 3

/**
 * `iopf_unrecoverable.reason`: external abort during the page table walk.
 */
#define IOPF_REASON_WALK_EXTERNAL_ABORT 4

/**
 * `iopf_unrecoverable.reason`: could not fetch a page table entry.
 */
#define IOPF_REASON_PTE_FETCH 5

/**
 * `iopf_unrecoverable.reason`: the translation exists but forbids the access.
 */
#define IOPF_REASON_PERMISSION 6

/**
 * `iopf_unrecoverable.reason`: access flag fault.
 */
#define IOPF_REASON_ACCESS 7

/**
 * `iopf_unrecoverable.reason`: the address is outside the translatable range.
 */
#define IOPF_REASON_OUT_OF_RANGE_ADDRESS 8

/**
 * The most requests one group has: a request buffer of this many entries always takes the
 * next group (longer groups are answered Invalid by the library and never handed out).
 */
#define IOPF_MAX_GROUP_REQUESTS 512

/**
 * While `iopf_backlog` is not 0 (answers wait for room in the response ring, and the host
 * rings no doorbell when it frees some), sleep at most this many milliseconds.
 */
#define IOPF_BACKLOG_RETRY_MS 1

/**
 * `iopf_dma_map` access: the device may read.
 */
#define IOPF_DMA_READ (1 << 0)

/**
 * `iopf_dma_map` access: the device may write.
 */
#define IOPF_DMA_WRITE (1 << 1)

/**
 * vfio-user: the region type of both queue regions (`VFIO_REGION_TYPE_NESTED`).
 */
#define IOPF_VFIO_REGION_TYPE_NESTED 4

/**
 * vfio-user: the region subtype of the DMA fault region (the fault queue).
 */
#define IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT 1

/**
 * vfio-user: the region subtype of the DMA fault response region (the response queue).
 */
#define IOPF_VFIO_REGION_SUBTYPE_DMA_FAULT_RESPONSE 2

/**
 * vfio-user: the region index of the DMA fault region.
 */
#define IOPF_VFIO_DMA_FAULT_REGION_INDEX 9

/**
 * vfio-user: the region index of the DMA fault response region (`GET_REGION_IO_FDS` of it
 * gives the response doorbell).
 */
#define IOPF_VFIO_DMA_FAULT_RESPONSE_REGION_INDEX 10

/**
 * vfio-user: the IRQ index of the fault doorbell (`DEVICE_SET_IRQS` with one eventfd).
 */
#define IOPF_VFIO_DMA_FAULT_IRQ_INDEX 5

/**
 * vfio-user: the offset in the response region that the response doorbell watches (the VMM
 * page's `index` word, which a response queue's ring does not read); a 4-byte region write
 * there is the doorbell's fallback.
 */
#define IOPF_VFIO_RESPONSE_DOORBELL_OFFSET 4160

/**
 * vfio-user: the region index of BAR0, the device's registers.
 */
#define IOPF_VFIO_BAR0_REGION_INDEX 0

/**
 * BAR0 register (8 bytes, write): guest-physical address of the PASID directory.
 */
#define IOPF_BAR0_DIRECTORY_BASE 0

/**
 * BAR0 register (8 bytes, write): entries of the PASID directory.
 */
#define IOPF_BAR0_DIRECTORY_ENTRIES 8

/**
 * BAR0 register (4 bytes, read): the host's number for the device.
 */
#define IOPF_BAR0_DEVICE_ID 16

/**
 * BAR0 register (4 bytes, read): the host's state (`IOPF_HOST_STATE_FINISHED`).
 */
#define IOPF_BAR0_HOST_STATE 24

/**
 * `IOPF_BAR0_HOST_STATE` bit: the host has finished; a VMM whose device is no longer live
 * leaves instead of attaching again.
 */
#define IOPF_HOST_STATE_FINISHED (1 << 0)

/**
 * The handle of an attached device. Never 0; a handle is never reused, so a call with a
 * detached device's handle fails with `-EBADF`.
 */
typedef uint64_t iopf_device;

/**
 * A whole page request group, as `iopf_drain_groups` hands it out. Its requests are
 * `requests[first .. first + count]` of the request buffer passed with it, in order; the last
 * one has `IOPF_REQUEST_LAST` set.
 */
struct iopf_group {
    /**
     * What to answer the group with (`iopf_answer`); never 0, never reused by this handle.
     */
    uint64_t cookie;
    /**
     * The host's number for the device the group came from.
     */
    uint32_t device;
    /**
     * `IOPF_GROUP_PASID_VALID` if `pasid` is valid.
     */
    uint32_t flags;
    /**
     * The group's PASID (the address space), if `flags` says so; else 0.
     */
    uint32_t pasid;
    /**
     * The device's PRG index for the group (9 bits).
     */
    uint32_t grpid;
    /**
     * Index of the group's first request in the request buffer.
     */
    uint32_t first;
    /**
     * Requests in the group (1 to `IOPF_MAX_GROUP_REQUESTS`).
     */
    uint32_t count;
};

/**
 * One page request of a group.
 */
struct iopf_page_request {
    /**
     * The page the device asks for (page-aligned).
     */
    uint64_t addr;
    /**
     * Device-specific data, if `flags` has `IOPF_REQUEST_PRIV_DATA_VALID`; else 0.
     */
    uint64_t private_data[2];
    /**
     * The access that faulted: `IOPF_PERM_*` bits.
     */
    uint32_t perm;
    /**
     * `IOPF_REQUEST_LAST`, `IOPF_REQUEST_PRIV_DATA_VALID`.
     */
    uint32_t flags;
};

/**
 * An unrecoverable fault: reported, never answered.
 */
struct iopf_unrecoverable {
    /**
     * The host's number for the device that faulted.
     */
    uint32_t device;
    /**
     * Why the translation failed: `IOPF_REASON_*`.
     */
    uint32_t reason;
    /**
     * `IOPF_UNRECOVERABLE_*_VALID` bits: which of `pasid`, `addr`, `fetch_addr` are valid.
     */
    uint32_t flags;
    /**
     * The address space, if valid; else 0.
     */
    uint32_t pasid;
    /**
     * The access that faulted: `IOPF_PERM_*` bits.
     */
    uint32_t perm;
    /**
     * Reserved, 0.
     */
    uint32_t reserved;
    /**
     * The faulting address, if valid; else 0.
     */
    uint64_t addr;
    /**
     * The address of the table entry whose fetch failed, if valid; else 0.
     */
    uint64_t fetch_addr;
};

/**
 * What a device counts (`iopf_stats`).
 */
struct iopf_stats {
    /**
     * Page requests read.
     */
    uint64_t requests;
    /**
     * Whole groups read.
     */
    uint64_t groups;
    /**
     * Unrecoverable faults read.
     */
    uint64_t unrecoverable;
    /**
     * Records that did not decode (an honest host writes none).
     */
    uint64_t malformed;
    /**
     * Answers the response ring took.
     */
    uint64_t responses;
    /**
     * Answers refused because too many waited already (the host does not read them).
     */
    uint64_t outbox_full;
    /**
     * Partial groups dropped (too long, or interrupted by another group).
     */
    uint64_t partial_groups_dropped;
    /**
     * Of those, groups too long whose last request arrived: answered Invalid by the library.
     */
    uint64_t oversized_answered;
    /**
     * Groups handed out and not answered yet.
     */
    uint64_t awaiting_answer;
    /**
     * Groups answered Invalid by the library because too many awaited an answer already.
     */
    uint64_t overflow_answered;
    /**
     * Answers queued and not yet taken by the response ring (`iopf_backlog`).
     */
    uint64_t backlog;
};

/**
 * No device: what the attach calls leave in `*device` when they fail.
 */
#define IOPF_NO_DEVICE 0

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * The library's version, "MAJOR.MINOR.PATCH" (a static string).
 */
const char *iopf_version(void);

/**
 * The message of the last call that failed on this thread (its cause chain joined by ": "),
 * or "" if none has. The string stays valid until the next failing call on this thread.
 * Successful calls leave it as it is.
 */
const char *iopf_last_error(void);

/**
 * Attaches the device served on the vfio-user socket `path` (an iopf host): connects, reads
 * the device number, finds both queue regions by type, takes the response doorbell, gives
 * the fault IRQ a new eventfd, and maps the regions. On success `*device` is the new handle;
 * on failure it is `IOPF_NO_DEVICE`. The connection stays open until `iopf_detach` (closing
 * it unregisters the device). Blocks on the socket.
 *
 * Returns 0, or -errno: -ENOENT / -ECONNREFUSED (no host there), -ECONNRESET (the host
 * refused the connection: every device is taken), -ENODEV (a region is missing), -EPROTO
 * (a region fails its checks), -EINVAL (a null pointer).
 *
 * # Safety
 *
 * `path` is NULL or a NUL-terminated string; `device` is NULL or writable.
 */
int iopf_attach_socket(const char *path, iopf_device *device);

/**
 * Attaches a device from fds the VMM already holds (its own vfio-user client, or fds passed
 * by a management process): `fault_region_fd` and `response_region_fd` (the memfds of the
 * DMA fault region and the DMA fault response region), `fault_irq_fd` (the eventfd the VMM
 * gave `DEVICE_SET_IRQS` of `IOPF_VFIO_DMA_FAULT_IRQ_INDEX`, before this call) and
 * `response_doorbell_fd` (the eventfd `GET_REGION_IO_FDS` of
 * `IOPF_VFIO_DMA_FAULT_RESPONSE_REGION_INDEX` gave, or -1). Each region is checked (seals,
 * size, magic, version, kind, geometry) before it is mapped. The fds are duplicated: the
 * caller keeps and closes its own. Such a handle has no vfio-user connection: `iopf_dma_map`,
 * `iopf_reset`, `iopf_host_finished` and the like return -ENOTSUP; use your own client.
 *
 * Returns 0, or -errno: -EBADF (an fd is not open), -EINVAL (a negative fd, a doorbell fd
 * that is not an eventfd, a region fd that is not a memfd, a null pointer), -EPROTO (a
 * region fails its checks: seals, size, magic, version, kind, geometry).
 *
 * # Safety
 *
 * `device` is NULL or writable; the fds, if not negative, are the caller's.
 */
int iopf_attach_fds(uint32_t device_number,
                    int fault_region_fd,
                    int response_region_fd,
                    int fault_irq_fd,
                    int response_doorbell_fd,
                    iopf_device *device);

/**
 * Detaches the device: closes its connection (the host unregisters it and answers its
 * pending groups Invalid) and its fds, including the one `iopf_fd` returned. The handle is
 * never valid again, whichever thread uses it. Returns 0, or -EBADF.
 */
int iopf_detach(iopf_device device);

/**
 * The host's number for the device (what `iopf_group.device` says), into `*number`.
 * Returns 0, or -EBADF, -EINVAL.
 *
 * # Safety
 *
 * `number` is NULL or writable.
 */
int iopf_device_number(iopf_device device, uint32_t *number);

/**
 * The fd to watch (readable: faults may be ready, or an answer was given from another
 * thread). Level-triggered: `iopf_woke` makes it unreadable again. Owned by the library,
 * valid until `iopf_detach`; do not close it. Returns the fd (>= 0), or -EBADF.
 */
int iopf_fd(iopf_device device);

/**
 * Reads the faults that are ready (at most 1024 records), assembles whole groups for
 * `iopf_drain_groups` and unrecoverable faults for `iopf_drain_unrecoverable`, then sends the
 * answers queued so far. Never blocks. Returns the records read (>= 0), or -errno: -EPROTO
 * (the host broke a queue: detach), -ENOBUFS (65,536 faults wait to be drained; answers were
 * still sent).
 */
int iopf_poll(iopf_device device);

/**
 * Sends the answers queued, as far as the response ring takes them (the rest wait, in
 * order: see `iopf_backlog`). Returns how many were sent, or -errno.
 */
int iopf_flush(iopf_device device);

/**
 * Before sleeping on `iopf_fd`: asks the host for a wake-up, then looks at the ring once
 * more. Returns 1 if it is safe to sleep, 0 if faults arrived meanwhile (poll again instead
 * of sleeping), or -errno.
 */
int iopf_prepare_to_sleep(iopf_device device);

/**
 * After sleeping (whether `iopf_fd` fired or the wait timed out): withdraws the wake-up
 * request and drains the device's eventfds. Returns 0, or -errno.
 */
int iopf_woke(iopf_device device);

/**
 * Answers waiting for room in the response ring. While it is not 0, sleep at most
 * `IOPF_BACKLOG_RETRY_MS` (the host rings no doorbell when it frees room). Returns the count,
 * or -errno.
 */
int iopf_backlog(iopf_device device);

/**
 * Whether the host says faults may still come: 1, or 0 once the host has stopped serving
 * the device (then `iopf_host_finished` says whether it finished for good). Returns -errno on
 * error.
 */
int iopf_live(iopf_device device);

/**
 * Moves whole page request groups read by `iopf_poll` into `groups` (room for `max_groups`)
 * and their requests into `requests` (room for `max_requests`): group `g` has requests
 * `requests[g.first .. g.first + g.count]`. A group is never split: draining stops before a
 * group whose requests do not fit. Answer each group exactly once, with `iopf_answer` and
 * its cookie.
 *
 * Returns the groups written (0: none waits), or -errno: -ENOSPC (the next group alone has
 * more requests than `max_requests`; a buffer of `IOPF_MAX_GROUP_REQUESTS` never gets it),
 * -EINVAL (a null or misaligned pointer, `max_groups` 0, a length above 2^24).
 *
 * # Safety
 *
 * `groups` is NULL or writable for `max_groups` entries; `requests` is NULL or writable for
 * `max_requests` entries; neither is used by another thread during the call.
 */
int iopf_drain_groups(iopf_device device,
                      struct iopf_group *groups,
                      size_t max_groups,
                      struct iopf_page_request *requests,
                      size_t max_requests);

/**
 * Moves unrecoverable faults read by `iopf_poll` into `faults` (room for `max_faults`).
 * Returns how many (0: none waits), or -errno (-EINVAL: a null or misaligned pointer,
 * `max_faults` 0 or above 2^24).
 *
 * # Safety
 *
 * `faults` is NULL or writable for `max_faults` entries, not used by another thread during
 * the call.
 */
int iopf_drain_unrecoverable(iopf_device device,
                             struct iopf_unrecoverable *faults,
                             size_t max_faults);

/**
 * Answers the group drained under `cookie` with `code` (`IOPF_ANSWER_SUCCESS`, `_INVALID`
 * or `_FAILURE`). Callable from any thread, also while another thread polls. The answer is
 * queued and sent by the next `iopf_poll` or `iopf_flush`; given outside `iopf_poll`, it
 * makes `iopf_fd` readable so the loop wakes to send it. Never blocks on the host.
 *
 * Returns 0, or -errno: -ENOENT (no group waits under that cookie: answered already, never
 * drained, or forgotten by `iopf_reset`), -EINVAL (an unknown code), -EAGAIN (65,536 answers
 * wait already: the host reads none; the group still waits, answer it again later).
 */
int iopf_answer(iopf_device device, uint64_t cookie, uint32_t code);

/**
 * The device's counters, into `*stats`; `size` is `sizeof(struct iopf_stats)` (a caller
 * built against another layout gets -EINVAL, not a short write). Returns 0, or -errno.
 *
 * # Safety
 *
 * `stats` is NULL or writable for `size` bytes.
 */
int iopf_stats(iopf_device device, struct iopf_stats *stats, size_t size);

/**
 * Gives the device guest memory: `VFIO_USER_DMA_MAP` of `len` bytes of `fd` from `offset`, at
 * IOVA `iova` (in direct mode, the guest-physical address), with access `prot`
 * (`IOPF_DMA_READ | IOPF_DMA_WRITE`). `fd` must be a memfd sealed with `F_SEAL_SHRINK`, at
 * least `offset + len` long; it is duplicated for the call, the caller keeps its own. Map
 * all memory right after attaching: the device starts 250 ms after the last `DMA_MAP`. Blocks
 * on the socket. Returns 0, or -errno (-ENOTSUP: attached from fds; the host's errno when it
 * refuses).
 */
int iopf_dma_map(iopf_device device,
                 int fd,
                 uint64_t offset,
                 uint64_t iova,
                 uint64_t len,
                 uint32_t prot);

/**
 * `VFIO_USER_DMA_UNMAP` of the mapping at `iova` of `len` bytes. Blocks on the socket.
 * Returns 0, or -errno.
 */
int iopf_dma_unmap(iopf_device device, uint64_t iova, uint64_t len);

/**
 * Nested mode: tells the device where the guest's PASID directory is (`entries` 8-byte
 * entries at guest-physical `base`), through the BAR0 registers. Without it the device runs
 * in direct mode. Blocks on the socket. Returns 0, or -errno.
 */
int iopf_set_pasid_directory(iopf_device device, uint64_t base, uint64_t entries);

/**
 * Whether the host says it has finished (BAR0 host state): 1 or 0, or -errno. A VMM whose
 * device is no longer live (`iopf_live` 0) and whose host has finished detaches and leaves.
 * Blocks on the socket.
 */
int iopf_host_finished(iopf_device device);

/**
 * Resets the device (`VFIO_USER_DEVICE_RESET`, e.g. on the guest's function-level reset):
 * the host applies the answers already sent and answers every other pending group Invalid.
 * The groups drained or read before it are forgotten here: their cookies return -ENOENT.
 * Same handle, same fd afterwards. Blocks on the socket. Returns 0, or -errno.
 */
int iopf_reset(iopf_device device);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* IOPF_H */
