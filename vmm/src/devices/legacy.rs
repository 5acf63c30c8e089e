//! The port-I/O bus.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::*;

/// Raises an interrupt line through an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a guest's port write asked of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Poweroff,
    Reboot,
    Panic,
    /// The guest ended its run with this status (the debug-exit port).
    Exit(u8),
}

/// ACPI sleep control: SLP_EN (bit 5) with SLP_TYP (bits 2..4) = 5 (the DSDT's \_S5).
const SLP_EN: u8 = 1 << 5;
const S5: u8 = 5;
/// pvpanic: bit 0 "panicked" (bit 1 "crash loaded" is only informational).
const PVPANIC_PANICKED: u8 = 1;

pub struct PortBus {
    serial: Mutex<Serial<IrqLine, NoEvents, Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for PortBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortBus")
    }
}

impl PortBus {
    pub fn new(serial_irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        PortBus {
            serial: Mutex::new(Serial::new(IrqLine(serial_irq), out)),
        }
    }

    fn serial(
        &self,
    ) -> std::sync::MutexGuard<'_, Serial<IrqLine, NoEvents, Box<dyn Write + Send>>> {
        self.serial
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            COM1..=0x3ff if data.len() == 1 => data[0] = self.serial().read((port - COM1) as u8),
            // i8042 status: nothing to read, ready for commands.
            0x64 if data.len() == 1 => data[0] = 0,
            ACPI_SLEEP_STATUS if data.len() == 1 => data[0] = 0,
            PVPANIC if data.len() == 1 => data[0] = PVPANIC_PANICKED,
            _ => {}
        }
    }

    pub fn write(&self, port: u16, data: &[u8]) -> Option<Request> {
        // The debug-exit port takes a byte, a word or a double word (QEMU's iosize);
        // the status is the low byte.
        if port == DEBUG_EXIT {
            return data.first().map(|s| Request::Exit(*s));
        }
        let [value] = data else { return None };
        match port {
            COM1..=0x3ff => {
                // A console that cannot write (a closed pipe) must not stop the guest.
                let _ = self.serial().write((port - COM1) as u8, *value);
                None
            }
            // i8042 command 0xfe pulses the CPU reset line.
            0x64 if *value == 0xfe => Some(Request::Reboot),
            ACPI_SLEEP_CONTROL if value & SLP_EN != 0 && (value >> 2) & 7 == S5 => {
                Some(Request::Poweroff)
            }
            ACPI_RESET if *value == ACPI_RESET_VALUE => Some(Request::Reboot),
            // Bit 2 of the PCI reset control register resets the CPU.
            PCI_RESET if value & 0x4 != 0 => Some(Request::Reboot),
            PVPANIC if value & PVPANIC_PANICKED != 0 => Some(Request::Panic),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn ports_do_what_the_guest_asks() {
        let sink = Sink::default();
        let bus = PortBus::new(EventFd::new(0).expect("eventfd"), Box::new(sink.clone()));
        for b in b"hi" {
            assert_eq!(bus.write(COM1, &[*b]), None);
        }
        assert_eq!(&sink.0.lock().expect("sink")[..], b"hi");
        assert_eq!(
            bus.write(ACPI_SLEEP_CONTROL, &[SLP_EN | (S5 << 2)]),
            Some(Request::Poweroff)
        );
        assert_eq!(bus.write(ACPI_SLEEP_CONTROL, &[S5 << 2]), None, "no SLP_EN");
        assert_eq!(
            bus.write(ACPI_RESET, &[ACPI_RESET_VALUE]),
            Some(Request::Reboot)
        );
        assert_eq!(bus.write(0x64, &[0xfe]), Some(Request::Reboot));
        assert_eq!(bus.write(PCI_RESET, &[0x6]), Some(Request::Reboot));
        assert_eq!(bus.write(PCI_RESET, &[0x2]), None);
        assert_eq!(bus.write(PVPANIC, &[1]), Some(Request::Panic));
        assert_eq!(bus.write(PVPANIC, &[2]), None, "crash-loaded only");
        assert_eq!(bus.write(DEBUG_EXIT, &[7]), Some(Request::Exit(7)));
        assert_eq!(bus.write(DEBUG_EXIT, &[0, 0, 0, 0]), Some(Request::Exit(0)));
        assert_eq!(bus.write(DEBUG_EXIT, &[]), None);
        let mut b = [0u8; 1];
        bus.read(0x80, &mut b);
        assert_eq!(b, [0xff]);
    }
}
