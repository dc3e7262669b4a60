//! Our client against our server over a real socket pair, one test per command and behaviour.

mod common;

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use common::{BAR0_SIZE, TestDevice, start, start_listening};
use iopf_abi::{QueueKind, REGION_MAGIC, VMM_ABI};
use iopf_queue::{Doorbell, FaultQueueConsumer, QueueRegion, SharedMemory};
use iopf_vfio_user::device::{
    DMA_FAULT_IRQ_INDEX, DMA_FAULT_REGION_INDEX, DMA_FAULT_RESPONSE_REGION_INDEX, NUM_IRQS,
    NUM_REGIONS, RESPONSE_PROD_OFFSET, VFIO_PCI_BAR1_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
    VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE, VFIO_REGION_TYPE_NESTED, VMM_ABI_OFFSET,
};
use iopf_vfio_user::protocol::MAX_MSG_FDS;
use iopf_vfio_user::{
    Capabilities, Client, ClientError, Command, DeviceFlags, DeviceInfo, Disconnect, DmaProt,
    Errno, Header, IoFd, IoFdKind, IrqAction, IrqFlags, IrqInfo, IrqSetFlags, RegionCapability,
    RegionFlags, RegionInfo, SetIrqs, SparseMmapArea, Version, VfioUserDevice,
};

fn connect() -> (Client, common::ServerThread) {
    let (stream, server) = start();
    let client = Client::from_stream(stream).unwrap();
    (client, server)
}

/// Closes the client and returns the device as the server left it.
fn finish(client: Client, server: common::ServerThread) -> TestDevice {
    client.close();
    let (device, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)), "{result:?}");
    device
}

fn remote_errno(result: Result<impl std::fmt::Debug, ClientError>) -> Errno {
    match result {
        Err(ClientError::Remote { errno, .. }) => errno,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

#[test]
fn version_negotiation_reports_the_server_limits() {
    let (client, server) = connect();
    let version = client.version();
    assert_eq!((version.major, version.minor), (0, 1));
    assert_eq!(version.capabilities.max_msg_fds(), 16);
    assert_eq!(version.capabilities.max_data_xfer_size(), 1 << 20);
    // Both limits are always sent, not left to the default (QEMU parses both).
    assert_eq!(version.capabilities.max_msg_fds, Some(16));
    assert_eq!(version.capabilities.max_data_xfer_size, Some(1 << 20));
    // Proposed by our client, so echoed; migration was not proposed and is never echoed.
    assert_eq!(version.capabilities.pgsizes, Some(4096));
    assert_eq!(version.capabilities.migration, None);
    assert_eq!(client.server_capabilities(), &version.capabilities);
    finish(client, server);
}

#[test]
fn device_info_counts_the_fault_regions_and_irq() {
    let (mut client, server) = connect();
    let info = client.device_info().unwrap();
    assert!(info.flags.contains(DeviceFlags::PCI | DeviceFlags::RESET));
    assert_eq!((info.num_regions, info.num_irqs), (NUM_REGIONS, NUM_IRQS));
    finish(client, server);
}

#[test]
fn fault_regions_are_found_by_type_and_attach_as_abi_v1_queues() {
    let (mut client, server) = connect();
    for (subtype, index, kind) in [
        (
            VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
            DMA_FAULT_REGION_INDEX,
            QueueKind::Fault,
        ),
        (
            VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT_RESPONSE,
            DMA_FAULT_RESPONSE_REGION_INDEX,
            QueueKind::Response,
        ),
    ] {
        let region = client
            .find_region_by_type(VFIO_REGION_TYPE_NESTED, subtype)
            .unwrap()
            .expect("region found by type");
        assert_eq!(region.index, index);
        assert_eq!(
            region.info.flags,
            RegionFlags::READ | RegionFlags::WRITE | RegionFlags::MMAP
        );
        assert_eq!(
            region.info.region_type(),
            Some((VFIO_REGION_TYPE_NESTED, subtype))
        );
        assert_eq!(region.info.mmap_offset, 0);
        let mapped = QueueRegion::attach(region.fd.expect("region fd"), kind).unwrap();
        let (host, _) = mapped.snapshot();
        assert_eq!(host.magic.get(), REGION_MAGIC);
        assert_eq!(region.info.size, 8192 + 64 * u64::from(kind.entry_size()));
    }
    assert!(
        client
            .find_region_by_type(VFIO_REGION_TYPE_NESTED, 3)
            .unwrap()
            .is_none()
    );
    finish(client, server);
}

#[test]
fn sparse_mmap_capability_and_fd_of_a_bar() {
    let (mut client, server) = connect();
    let bar0 = client.region_info(0).unwrap();
    assert_eq!(bar0.info.size, BAR0_SIZE);
    assert_eq!(
        bar0.info.caps,
        vec![RegionCapability::SparseMmap(vec![SparseMmapArea {
            offset: 4096,
            size: 4096
        }])]
    );
    assert!(bar0.fd.is_some());
    finish(client, server);
}

#[test]
fn absent_regions_have_size_zero_and_no_fd() {
    let (mut client, server) = connect();
    let bar1 = client.region_info(VFIO_PCI_BAR1_REGION_INDEX).unwrap();
    assert_eq!(bar1.info.size, 0);
    assert!(bar1.info.flags.is_empty() && bar1.info.caps.is_empty() && bar1.fd.is_none());
    let config = client.region_info(VFIO_PCI_CONFIG_REGION_INDEX).unwrap();
    assert!(config.fd.is_none());
    assert_eq!(config.info.flags, RegionFlags::READ | RegionFlags::WRITE);
    finish(client, server);
}

#[test]
fn region_index_past_the_count_is_einval() {
    let (mut client, server) = connect();
    assert_eq!(remote_errno(client.region_info(NUM_REGIONS)), Errno::EINVAL);
    assert_eq!(remote_errno(client.region_io_fds(u32::MAX)), Errno::EINVAL);
    // The connection goes on.
    assert!(client.region_info(0).is_ok());
    finish(client, server);
}

#[test]
fn irq_info_of_the_dma_fault_irq() {
    let (mut client, server) = connect();
    let irq = client.irq_info(DMA_FAULT_IRQ_INDEX).unwrap();
    assert_eq!((irq.flags, irq.count), (IrqFlags::EVENTFD, 1));
    assert_eq!(client.irq_info(VFIO_PCI_MSI_IRQ_INDEX).unwrap().count, 0);
    assert_eq!(remote_errno(client.irq_info(NUM_IRQS)), Errno::EINVAL);
    finish(client, server);
}

#[test]
fn set_irqs_hands_the_vmm_eventfd_to_the_device() {
    let (mut client, server) = connect();
    let doorbell = Doorbell::new().unwrap();
    client
        .set_irqs(DMA_FAULT_IRQ_INDEX, &[doorbell.as_fd()])
        .unwrap();
    let mut device = finish(client, server);
    let fd = device
        .log
        .eventfds
        .remove(&(DMA_FAULT_IRQ_INDEX, 0))
        .unwrap();
    // The device rings the fd it received; the VMM's eventfd wakes.
    Doorbell::from_fd(fd).unwrap().ring().unwrap();
    assert!(doorbell.wait(Some(Duration::from_secs(1))).unwrap());
}

#[test]
fn set_irqs_outside_the_index_count_is_refused() {
    let (mut client, server) = connect();
    let a = Doorbell::new().unwrap();
    let b = Doorbell::new().unwrap();
    assert_eq!(
        remote_errno(client.set_irqs(DMA_FAULT_IRQ_INDEX, &[a.as_fd(), b.as_fd()])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(client.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, &[a.as_fd()])),
        Errno::EINVAL
    );
    let device = finish(client, server);
    assert!(device.log.eventfds.is_empty());
}

#[test]
fn disable_irqs_makes_the_device_forget_the_eventfd() {
    let (mut client, server) = connect();
    let doorbell = Doorbell::new().unwrap();
    client
        .set_irqs(DMA_FAULT_IRQ_INDEX, &[doorbell.as_fd()])
        .unwrap();
    client.disable_irqs(DMA_FAULT_IRQ_INDEX).unwrap();
    let device = finish(client, server);
    assert!(device.log.eventfds.is_empty());
    assert_eq!(
        device.log.irq_actions,
        vec![(DMA_FAULT_IRQ_INDEX, 0, 0, IrqAction::Trigger, None)]
    );
}

#[test]
fn set_irqs_with_bool_data_and_mask_action() {
    let (mut client, server) = connect();
    client
        .set_irqs_with(
            IrqSetFlags::DATA_BOOL | IrqSetFlags::ACTION_MASK,
            VFIO_PCI_INTX_IRQ_INDEX,
            0,
            1,
            &[1],
            &[],
        )
        .unwrap();
    let device = finish(client, server);
    assert_eq!(
        device.log.irq_actions,
        vec![(
            VFIO_PCI_INTX_IRQ_INDEX,
            0,
            1,
            IrqAction::Mask,
            Some(vec![true])
        )]
    );
}

#[test]
fn region_read_and_write_through_the_socket() {
    let (mut client, server) = connect();
    let mut id = [0u8; 4];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut id)
        .unwrap();
    assert_eq!(id, [0xf4, 0x1a, 0x10, 0x10]);
    client
        .region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x40, &[1, 2, 3])
        .unwrap();
    let mut back = [0u8; 3];
    client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0x40, &mut back)
        .unwrap();
    assert_eq!(back, [1, 2, 3]);
    // A whole memfd-backed region in one read.
    let mut bar = vec![0u8; BAR0_SIZE as usize];
    client.region_read(0, 0, &mut bar).unwrap();
    finish(client, server);
}

#[test]
fn host_page_of_a_fault_region_reads_through_the_socket() {
    let (mut client, server) = connect();
    let mut magic = [0u8; 4];
    client
        .region_read(DMA_FAULT_REGION_INDEX, 0, &mut magic)
        .unwrap();
    assert_eq!(u32::from_le_bytes(magic), REGION_MAGIC);
    finish(client, server);
}

#[test]
fn access_outside_a_region_or_against_its_flags_is_einval() {
    let (mut client, server) = connect();
    let mut buf = [0u8; 8];
    assert_eq!(
        remote_errno(client.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 252, &mut buf)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(client.region_write(VFIO_PCI_BAR1_REGION_INDEX, 0, &[0])),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(client.region_read(NUM_REGIONS, 0, &mut buf)),
        Errno::EINVAL
    );
    assert_eq!(
        remote_errno(client.region_read(0, u64::MAX - 2, &mut buf)),
        Errno::EINVAL
    );
    let device = finish(client, server);
    assert!(device.log.region_writes.is_empty());
}

#[test]
fn region_io_fds_give_the_response_doorbell_on_prod() {
    let (mut client, server) = connect();
    let io_fds = client
        .region_io_fds(DMA_FAULT_RESPONSE_REGION_INDEX)
        .unwrap();
    assert_eq!(io_fds.sub_regions.len(), 1);
    assert_eq!(io_fds.fds.len(), 1);
    let (io_fd, _) = io_fds.sub_regions[0];
    assert_eq!((io_fd.offset, io_fd.size), (RESPONSE_PROD_OFFSET, 4));
    assert_eq!(io_fd.kind, IoFdKind::IoEventFd);
    // The VMM rings the fd it received; the host's doorbell counts it.
    let fd: OwnedFd = io_fds.fd(0).unwrap().try_clone_to_owned().unwrap();
    Doorbell::from_fd(fd).unwrap().ring().unwrap();
    assert!(
        client
            .region_io_fds(DMA_FAULT_REGION_INDEX)
            .unwrap()
            .sub_regions
            .is_empty()
    );
    let device = finish(client, server);
    assert_eq!(device.response_doorbell.drain().unwrap(), 1);
}

#[test]
fn region_write_on_prod_is_the_doorbell_fallback() {
    let (mut client, server) = connect();
    client
        .region_write(
            DMA_FAULT_RESPONSE_REGION_INDEX,
            RESPONSE_PROD_OFFSET,
            &1u32.to_le_bytes(),
        )
        .unwrap();
    let device = finish(client, server);
    assert_eq!(device.response_doorbell.drain().unwrap(), 1);
    assert_eq!(device.response.snapshot().1.index.get(), 1);
}

#[test]
fn attach_sequence_of_a_vmm() {
    // VERSION → DEVICE_GET_INFO → GET_REGION_INFO by type → mmap → SET_IRQS index 5 → abi = 1.
    let (mut client, server) = connect();
    let info = client.device_info().unwrap();
    assert_eq!(info.num_regions, NUM_REGIONS);
    let fault = client
        .find_region_by_type(
            VFIO_REGION_TYPE_NESTED,
            VFIO_REGION_SUBTYPE_NESTED_DMA_FAULT,
        )
        .unwrap()
        .unwrap();
    let fault_irq = Doorbell::new().unwrap();
    client
        .set_irqs(DMA_FAULT_IRQ_INDEX, &[fault_irq.as_fd()])
        .unwrap();
    let consumer = FaultQueueConsumer::attach(fault.fd.unwrap(), fault_irq).unwrap();
    let device = finish(client, server);
    // The VMM's abi = 1, written through its mapping, is in the host's region.
    assert_eq!(device.fault.snapshot().1.abi.get(), VMM_ABI);
    drop(consumer);
}

#[test]
fn abi_can_be_written_through_the_socket_too() {
    let (mut client, server) = connect();
    client
        .region_write(
            DMA_FAULT_REGION_INDEX,
            VMM_ABI_OFFSET,
            &VMM_ABI.to_le_bytes(),
        )
        .unwrap();
    let device = finish(client, server);
    assert_eq!(device.fault.snapshot().1.abi.get(), VMM_ABI);
}

#[test]
fn dma_map_passes_the_memory_fd_and_unmap_must_match() {
    let (mut client, server) = connect();
    let guest = SharedMemory::create("guest", 65536).unwrap();
    let prot = DmaProt::READ | DmaProt::WRITE;
    client
        .dma_map(Some(guest.fd()), 0, 0x10_0000, 65536, prot)
        .unwrap();
    assert_eq!(
        remote_errno(client.dma_map(Some(guest.fd()), 0, 0x10_0000, 4096, prot)),
        Errno::EEXIST
    );
    assert_eq!(
        remote_errno(client.dma_unmap(0x10_0000, 4096)),
        Errno::ENOENT
    );
    client
        .dma_map(None, 0, 0x20_0000, 4096, DmaProt::READ)
        .unwrap();
    client.dma_unmap(0x20_0000, 4096).unwrap();
    let device = finish(client, server);
    assert_eq!(device.log.mappings.len(), 1);
    let mapping = &device.log.mappings[0];
    assert_eq!(
        (mapping.iova, mapping.size, mapping.prot),
        (0x10_0000, 65536, prot)
    );
    let fd = mapping.fd.as_ref().expect("the memory's fd");
    assert_eq!(rustix::fs::fstat(fd).unwrap().st_size, 65536);
}

#[test]
fn dma_unmap_all_clears_every_mapping() {
    let (mut client, server) = connect();
    client
        .dma_map(None, 0, 0x1000, 0x1000, DmaProt::READ)
        .unwrap();
    client
        .dma_map(None, 0, 0x4000, 0x1000, DmaProt::WRITE)
        .unwrap();
    client.dma_unmap_all().unwrap();
    let device = finish(client, server);
    assert!(device.log.mappings.is_empty());
}

#[test]
fn reset_reaches_the_device() {
    let (mut client, server) = connect();
    client.reset().unwrap();
    client.reset().unwrap();
    assert_eq!(finish(client, server).log.resets, 2);
}

#[test]
fn client_connects_by_path() {
    let (path, server, _stream) = start_listening("path");
    let mut client = Client::connect(&path).unwrap();
    assert_eq!(client.device_info().unwrap().num_irqs, NUM_IRQS);
    finish(client, server);
}

#[test]
fn connecting_to_nothing_is_a_connect_error() {
    let path = common::socket_path("nothing");
    assert!(matches!(
        Client::connect(&path),
        Err(ClientError::Connect { .. })
    ));
}

#[test]
fn server_end_closing_is_seen_by_the_client() {
    let (stream, server) = start();
    let mut client = Client::from_stream(stream.try_clone().unwrap()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (_, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)));
    assert!(client.device_info().is_err());
}

#[test]
fn set_timeout_changes_the_request_limit_the_options_report() {
    let (mut client, server) = connect();
    client.set_timeout(Some(Duration::from_secs(3))).unwrap();
    assert_eq!(client.options().request, Some(Duration::from_secs(3)));
    client.set_timeout(None).unwrap();
    assert_eq!(client.options().request, None);
    assert_eq!(client.device_info().unwrap().num_irqs, NUM_IRQS);
    finish(client, server);
}

// Catches: a close that only drops the client's fd, while another copy of the socket (say,
// inherited by a child process) keeps the connection open.
#[test]
fn close_ends_the_connection_even_while_another_handle_to_the_socket_is_open() {
    let (stream, server) = start();
    let client = Client::from_stream(stream.try_clone().unwrap()).unwrap();
    client.close();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!((&stream).read(&mut [0; 1]).unwrap(), 0, "end of stream");
    let (_, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)), "{result:?}");
}

/// Proposes `capabilities` on a raw connection; returns the server's version reply.
fn propose(conn: &mut iopf_vfio_user::Connection, capabilities: Capabilities) -> Version {
    let proposal = Version {
        major: 0,
        minor: 0,
        capabilities,
    }
    .encode();
    conn.send_parts(
        &Header::command(0, Command::Version, proposal.len()),
        &proposal,
        &[],
    )
    .unwrap();
    let reply = conn.recv().unwrap().expect("the version reply");
    Version::decode(&reply.payload).unwrap()
}

/// A VMM of our own making: proposes `capabilities` on a raw connection to a fresh server;
/// returns the connection and the server's version reply.
fn raw_vmm(
    capabilities: Capabilities,
) -> (iopf_vfio_user::Connection, common::ServerThread, Version) {
    let (stream, server) = start();
    let mut conn = iopf_vfio_user::Connection::new(stream);
    let version = propose(&mut conn, capabilities);
    (conn, server, version)
}

/// Sends `GET_REGION_IO_FDS` for region `index` (argsz 4096) and returns the reply.
fn ask_io_fds(conn: &mut iopf_vfio_user::Connection, index: u32) -> iopf_vfio_user::Message {
    let request = iopf_vfio_user::request::encode::get_region_io_fds(index, 4096);
    conn.send_parts(
        &Header::command(1, Command::DeviceGetRegionIoFds, request.len()),
        &request,
        &[],
    )
    .unwrap();
    conn.recv().unwrap().expect("a reply")
}

fn close_raw(conn: iopf_vfio_user::Connection, server: common::ServerThread) {
    drop(conn);
    let (_, result) = server.join().unwrap();
    assert!(matches!(result, Ok(Disconnect::Closed)), "{result:?}");
}

// Catches: max_dma_maps not echoed to a VMM that proposes it (QEMU does), or not capped.
#[test]
fn a_vmm_proposing_max_dma_maps_is_told_the_smaller_of_both_limits() {
    for (theirs, agreed) in [(100, 100), (1_000_000, 65535)] {
        let (conn, server, version) = raw_vmm(Capabilities {
            max_dma_maps: Some(theirs),
            ..Capabilities::default()
        });
        assert_eq!(version.capabilities.max_dma_maps, Some(agreed));
        close_raw(conn, server);
    }
}

// Catches: an fd sent to a client that said it takes none, or withheld from one that takes
// exactly as many as the reply has.
#[test]
fn region_io_fds_respect_the_fds_a_vmm_accepts() {
    for (max_msg_fds, fds) in [(1, 1), (0, 0)] {
        let (mut conn, server, _) = raw_vmm(Capabilities {
            max_msg_fds: Some(max_msg_fds),
            ..Capabilities::default()
        });
        let reply = ask_io_fds(&mut conn, DMA_FAULT_RESPONSE_REGION_INDEX);
        assert_eq!(reply.fds.len(), fds);
        if fds == 0 {
            assert!(reply.header.is_error());
            assert_eq!(Errno(reply.header.error), Errno::E2BIG);
        } else {
            assert!(!reply.header.is_error(), "{:?}", reply.header);
        }
        close_raw(conn, server);
    }
}

/// A device that forgets to say it is PCI, and has nothing but one region served through
/// `io_fds` (one sub-region each).
#[derive(Default)]
struct Bare {
    io_fds: Vec<std::fs::File>,
}

/// Serves `device` on one end of a socket pair; returns the other end and the server's
/// thread, which ends with how the connection ended.
fn serve_bare(
    device: Bare,
) -> (
    std::os::unix::net::UnixStream,
    std::thread::JoinHandle<Result<Disconnect, iopf_vfio_user::ServerError>>,
) {
    let (stream, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut device = device;
        iopf_vfio_user::Server::new(common::test_config()).serve(theirs, &mut device)
    });
    (stream, server)
}

impl VfioUserDevice for Bare {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            flags: DeviceFlags::RESET,
            num_regions: 1,
            num_irqs: 0,
        }
    }
    fn region_io_fds(&self, _: u32) -> Result<Vec<(IoFd, BorrowedFd<'_>)>, Errno> {
        Ok((0..)
            .zip(&self.io_fds)
            .map(|(i, file)| {
                let io_fd = IoFd {
                    offset: 8 * i,
                    size: 4,
                    kind: IoFdKind::IoEventFd,
                    flags: 0,
                    data: 0,
                };
                (io_fd, file.as_fd())
            })
            .collect())
    }
    fn region_info(&self, _: u32) -> Option<RegionInfo> {
        None
    }
    fn region_fd(&self, _: u32) -> Option<BorrowedFd<'_>> {
        None
    }
    fn irq_info(&self, _: u32) -> Option<IrqInfo> {
        None
    }
    fn region_read(&mut self, _: u32, _: u64, _: &mut [u8]) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn region_write(&mut self, _: u32, _: u64, _: &[u8]) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
    fn set_irqs(&mut self, _: SetIrqs) -> Result<(), Errno> {
        Err(Errno::EINVAL)
    }
}

// Catches: the PCI flag left to each device (QEMU's vfio-user-pci refuses a non-PCI device).
#[test]
fn every_device_is_reported_as_pci() {
    let (stream, server) = serve_bare(Bare::default());
    let mut client = Client::from_stream(stream).unwrap();
    let info = client.device_info().unwrap();
    assert_eq!(info.flags, DeviceFlags::PCI | DeviceFlags::RESET);
    client.close();
    assert!(matches!(server.join().unwrap(), Ok(Disconnect::Closed)));
}

// Catches: trait defaults that claim success for what the device cannot do.
#[test]
fn a_device_without_dma_or_reset_refuses_them_with_enotsup() {
    let (stream, server) = serve_bare(Bare::default());
    let mut client = Client::from_stream(stream).unwrap();
    assert_eq!(
        remote_errno(client.dma_map(None, 0, 0x1000, 0x1000, DmaProt::READ)),
        Errno::ENOTSUP
    );
    assert_eq!(
        remote_errno(client.dma_unmap(0x1000, 0x1000)),
        Errno::ENOTSUP
    );
    assert_eq!(remote_errno(client.reset()), Errno::ENOTSUP);
    client.close();
    assert!(matches!(server.join().unwrap(), Ok(Disconnect::Closed)));
}

// Catches: a reply with more fds than one message carries, or one refused at exactly that many.
#[test]
fn region_io_fds_go_up_to_the_fds_of_one_message_and_no_further() {
    for (n, sent) in [(MAX_MSG_FDS, true), (MAX_MSG_FDS + 1, false)] {
        let (stream, server) = serve_bare(Bare {
            io_fds: (0..n)
                .map(|_| std::fs::File::open("/dev/null").unwrap())
                .collect(),
        });
        let mut conn = iopf_vfio_user::Connection::new(stream);
        propose(
            &mut conn,
            Capabilities {
                max_msg_fds: Some(100),
                ..Capabilities::default()
            },
        );
        let reply = ask_io_fds(&mut conn, 0);
        if sent {
            assert!(!reply.header.is_error(), "{:?}", reply.header);
            assert_eq!(reply.fds.len(), n);
        } else {
            assert_eq!(Errno(reply.header.error), Errno::E2BIG);
            assert!(reply.fds.is_empty());
        }
        drop(conn);
        assert!(matches!(server.join().unwrap(), Ok(Disconnect::Closed)));
    }
}
