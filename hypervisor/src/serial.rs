//! A COM1 8250 UART, enough for a polled transmitter: THR writes are captured, LSR always
//! says "transmitter empty", the other registers hold what was written.
use serde::{Deserialize, Serialize};
use std::io::Write;

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// How much recent output the ring keeps.
const RING_CAPACITY: usize = 64 * 1024;

const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;
const LCR_DLAB: u8 = 0x80;

/// Register state that travels with the VM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub ier: u8,
    pub lcr: u8,
    pub mcr: u8,
    pub scr: u8,
    pub dll: u8,
    pub dlm: u8,
}

/// The UART plus its captured output.
pub struct Serial {
    regs: SerialState,
    ring: Vec<u8>,
    log: Option<std::fs::File>,
}

impl Serial {
    pub fn new(log: Option<std::fs::File>) -> Self {
        Self {
            regs: SerialState {
                dll: 12, // 9600 baud, what firmware leaves behind
                ..Default::default()
            },
            ring: Vec::new(),
            log,
        }
    }

    /// Whether `port` belongs to this UART.
    pub fn owns(port: u16) -> bool {
        (COM1..COM1 + 8).contains(&port)
    }

    pub fn write(&mut self, port: u16, value: u8) {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        match port - COM1 {
            0 if dlab => self.regs.dll = value,
            0 => self.transmit(value),
            1 if dlab => self.regs.dlm = value,
            1 => self.regs.ier = value & 0x0f,
            3 => self.regs.lcr = value,
            4 => self.regs.mcr = value,
            7 => self.regs.scr = value,
            _ => {} // FCR and read-only registers
        }
    }

    pub fn read(&self, port: u16) -> u8 {
        let dlab = self.regs.lcr & LCR_DLAB != 0;
        match port - COM1 {
            0 if dlab => self.regs.dll,
            1 if dlab => self.regs.dlm,
            1 => self.regs.ier,
            2 => 0x01, // IIR: no interrupt pending
            3 => self.regs.lcr,
            4 => self.regs.mcr,
            5 => LSR_THRE | LSR_TEMT,
            6 => 0xb0, // MSR: DCD, DSR, CTS
            7 => self.regs.scr,
            _ => 0, // RBR: no input
        }
    }

    fn transmit(&mut self, byte: u8) {
        if self.ring.len() >= RING_CAPACITY {
            self.ring.drain(..RING_CAPACITY / 2);
        }
        self.ring.push(byte);
        if let Some(log) = &mut self.log {
            if log.write_all(&[byte]).is_err() {
                self.log = None; // a full disk must not stop the guest
            }
        }
    }

    /// The most recent output (up to 64 KiB).
    pub fn output(&self) -> &[u8] {
        &self.ring
    }

    pub fn state(&self) -> SerialState {
        self.regs.clone()
    }

    pub fn set_state(&mut self, s: &SerialState) {
        self.regs = s.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_reports_empty_transmitter() {
        let mut s = Serial::new(None);
        s.write(COM1 + 3, 0x80);
        s.write(COM1, 1); // divisor, not output
        s.write(COM1 + 3, 0x03);
        for b in b"hi" {
            s.write(COM1, *b);
        }
        assert_eq!(s.output(), b"hi");
        assert_eq!(s.read(COM1 + 5) & 0x60, 0x60);
        assert_eq!(s.state().dll, 1);
    }
}
