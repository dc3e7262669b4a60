/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * The smallest C VMM on libiopf: it attaches to every device of an `iopf host`, gives each its
 * own guest memory, answers every page request group from one epoll loop, and exits 0 when
 * the host has finished. The C twin of crates/vmm/examples/minimal.rs.
 *
 *   iopf host --socket /tmp/iopf.sock --scenario scenarios/direct.toml &
 *   cc -std=c11 -Wall -Wextra -Werror minimal_vmm.c $(pkg-config --cflags --libs iopf) \
 *       -o minimal_vmm
 *   ./minimal_vmm --socket /tmp/iopf.sock
 *
 * It keeps no page tables (direct mode, docs/PROTOCOL.md section 4.6): it maps guest memory
 * and writes no PASID directory, and answers a group Success when it has no PASID and all its
 * pages lie in the device's guest memory, Invalid otherwise.
 */
#define _GNU_SOURCE /* memfd_create */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <iopf.h>

/* Guest memory per device: 64 MiB at guest-physical 0 (scenarios/direct.toml's buffers lie
 * below 34 MiB). A memfd is sparse: only the pages DMA touches cost memory. */
#define GUEST_MEMORY (64ull << 20)
#define MAX_DEVICES 1024
#define MAX_GROUPS 64

struct guest {
    iopf_device device;
    uint32_t number;
    int memfd;
    int attached; /* still served */
    uint64_t success, invalid, unrecoverable;
};

static struct guest guests[MAX_DEVICES];
static size_t nb_guests;

/* Caller buffers: a request buffer of IOPF_MAX_GROUP_REQUESTS always takes the next group. */
static struct iopf_group groups[MAX_GROUPS];
static struct iopf_page_request requests[IOPF_MAX_GROUP_REQUESTS * 4];
static struct iopf_unrecoverable faults[64];

static int fail(const char *what, int err)
{
    fprintf(stderr, "minimal_vmm: %s: %s (%s)\n", what, iopf_last_error(), strerror(-err));
    return 1;
}

/* A memfd of `len` bytes the host accepts: sealable, sized, sealed against shrinking. */
static int guest_memfd(uint64_t len)
{
    int fd = memfd_create("guest", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)len) < 0 || fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) < 0) {
        int err = -errno;
        close(fd);
        return err;
    }
    return fd;
}

/* The vIOMMU: Success when the group has no PASID and every page is in guest memory. */
static uint32_t answer(const struct iopf_group *g)
{
    if (g->flags & IOPF_GROUP_PASID_VALID)
        return IOPF_ANSWER_INVALID;
    for (uint32_t i = g->first; i < g->first + g->count; i++)
        if (requests[i].addr >= GUEST_MEMORY)
            return IOPF_ANSWER_INVALID;
    return IOPF_ANSWER_SUCCESS;
}

/* Reads what is ready, answers every whole group, counts unrecoverable faults. */
static int serve(struct guest *g)
{
    int n = iopf_poll(g->device);
    if (n < 0)
        return fail("iopf_poll", n);
    for (;;) {
        n = iopf_drain_groups(g->device, groups, MAX_GROUPS, requests,
                              sizeof(requests) / sizeof(requests[0]));
        if (n < 0)
            return fail("iopf_drain_groups", n);
        if (n == 0)
            break;
        for (int i = 0; i < n; i++) {
            /* A real vIOMMU injects the group into the guest and answers later, from any
             * thread, with the cookie. */
            uint32_t code = answer(&groups[i]);
            int err = iopf_answer(g->device, groups[i].cookie, code);
            if (err < 0)
                return fail("iopf_answer", err);
            if (code == IOPF_ANSWER_SUCCESS)
                g->success++;
            else
                g->invalid++;
        }
    }
    while ((n = iopf_drain_unrecoverable(g->device, faults, 64)) > 0)
        g->unrecoverable += (uint64_t)n;
    if (n < 0)
        return fail("iopf_drain_unrecoverable", n);
    /* The answers given above, outside iopf_poll: send them now. */
    n = iopf_flush(g->device);
    return n < 0 ? fail("iopf_flush", n) : 0;
}

/* The device is no longer live: read what is left, check the host has finished, account,
 * detach. */
static int leave(struct guest *g, int epoll)
{
    int err = serve(g);
    if (err)
        return err;
    int finished = iopf_host_finished(g->device);
    if (finished < 0)
        return fail("iopf_host_finished", finished);
    if (!finished) {
        fprintf(stderr, "minimal_vmm: device %" PRIu32 ": unregistered by a host that runs on\n",
                g->number);
        return 1;
    }
    struct iopf_stats stats;
    err = iopf_stats(g->device, &stats, sizeof(stats));
    if (err < 0)
        return fail("iopf_stats", err);
    printf("device %" PRIu32 ": %" PRIu64 " page requests in %" PRIu64 " groups, answered %" PRIu64
           " success %" PRIu64 " invalid (%" PRIu64 " responses sent), %" PRIu64
           " unrecoverable faults\n",
           g->number, stats.requests, stats.groups, g->success, g->invalid, stats.responses,
           g->unrecoverable);
    if (stats.awaiting_answer != 0 || stats.backlog != 0) {
        fprintf(stderr, "minimal_vmm: device %" PRIu32 ": %" PRIu64 " groups unanswered, %" PRIu64
                " answers unsent\n", g->number, stats.awaiting_answer, stats.backlog);
        return 1;
    }
    int fd = iopf_fd(g->device);
    if (fd >= 0 && epoll_ctl(epoll, EPOLL_CTL_DEL, fd, NULL) < 0) {
        perror("minimal_vmm: epoll_ctl(DEL)");
        return 1;
    }
    err = iopf_detach(g->device);
    if (err < 0)
        return fail("iopf_detach", err);
    close(g->memfd);
    g->attached = 0;
    return 0;
}

/* Attaches the next free device of the host; 1 if the host refused (every device taken). */
static int attach(const char *socket, int epoll)
{
    struct guest *g = &guests[nb_guests];
    int err = iopf_attach_socket(socket, &g->device);
    if (err == -ECONNRESET && nb_guests > 0)
        return 1;
    if (err < 0)
        return -fail("iopf_attach_socket", err);
    g->attached = 1;
    nb_guests++;
    if ((err = iopf_device_number(g->device, &g->number)) < 0)
        return -fail("iopf_device_number", err);
    if ((g->memfd = guest_memfd(GUEST_MEMORY)) < 0) {
        fprintf(stderr, "minimal_vmm: guest memory: %s\n", strerror(-g->memfd));
        return -1;
    }
    /* No PASID directory follows: the device starts in direct mode once memory is mapped. */
    err = iopf_dma_map(g->device, g->memfd, 0, 0, GUEST_MEMORY, IOPF_DMA_READ | IOPF_DMA_WRITE);
    if (err < 0)
        return -fail("iopf_dma_map", err);
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = nb_guests - 1};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, iopf_fd(g->device), &ev) < 0) {
        perror("minimal_vmm: epoll_ctl(ADD)");
        return -1;
    }
    /* Serve the devices attached so far while the others attach. */
    for (size_t i = 0; i < nb_guests; i++)
        if ((err = serve(&guests[i])) != 0)
            return -err;
    return 0;
}

int main(int argc, char **argv)
{
    const char *socket = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--socket") == 0 && i + 1 < argc)
            socket = argv[++i];
        else {
            fprintf(stderr, "usage: %s --socket PATH\n", argv[0]);
            return 2;
        }
    }
    if (!socket) {
        fprintf(stderr, "usage: %s --socket PATH\n", argv[0]);
        return 2;
    }
    int epoll = epoll_create1(EPOLL_CLOEXEC);
    if (epoll < 0) {
        perror("minimal_vmm: epoll_create1");
        return 1;
    }
    for (;;) {
        if (nb_guests == MAX_DEVICES) {
            fprintf(stderr, "minimal_vmm: more than %d devices\n", MAX_DEVICES);
            return 1;
        }
        int err = attach(socket, epoll);
        if (err < 0)
            return 1;
        if (err == 1)
            break;
    }

    size_t left = nb_guests;
    while (left > 0) {
        /* 1. Read what is ready and answer it. 2. A device the host no longer serves leaves. */
        for (size_t i = 0; i < nb_guests; i++) {
            struct guest *g = &guests[i];
            if (!g->attached)
                continue;
            if (serve(g))
                return 1;
            int live = iopf_live(g->device);
            if (live < 0)
                return fail("iopf_live", live);
            if (!live) {
                if (leave(g, epoll))
                    return 1;
                left--;
            }
        }
        if (left == 0)
            break;
        /* 3. Ask every device for a wake-up; if faults arrived meanwhile, serve again. */
        int sleep = 1, backlog = 0;
        for (size_t i = 0; i < nb_guests; i++) {
            if (!guests[i].attached)
                continue;
            int ready = iopf_prepare_to_sleep(guests[i].device);
            if (ready < 0)
                return fail("iopf_prepare_to_sleep", ready);
            sleep &= ready;
            int b = iopf_backlog(guests[i].device);
            if (b < 0)
                return fail("iopf_backlog", b);
            backlog |= b > 0;
        }
        /* 4. Sleep on every device's fd (briefly while answers wait for ring room). */
        if (sleep) {
            struct epoll_event events[64];
            int timeout = backlog ? IOPF_BACKLOG_RETRY_MS : 100;
            if (epoll_wait(epoll, events, 64, timeout) < 0 && errno != EINTR) {
                perror("minimal_vmm: epoll_wait");
                return 1;
            }
        }
        /* 5. Withdraw the wake-up requests and drain the fds, fired or not. */
        for (size_t i = 0; i < nb_guests; i++) {
            if (!guests[i].attached)
                continue;
            int err = iopf_woke(guests[i].device);
            if (err < 0)
                return fail("iopf_woke", err);
        }
    }
    close(epoll);
    return 0;
}
