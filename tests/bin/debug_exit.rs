//! `minivmm-test-debug-exit V`: writes V (a 32-bit `outl`) to I/O port 0xf4,
//! QEMU's isa-debug-exit, as a guest test image would. A dynamically linked
//! program, so the real-guest test also shows `minivmm run --add` bringing
//! its interpreter and libraries.

use std::process::ExitCode;

/// isa-debug-exit's port.
const PORT: u16 = 0xf4;

fn main() -> ExitCode {
    let Some(value) = std::env::args().nth(1).and_then(|v| v.parse::<u32>().ok()) else {
        eprintln!("usage: minivmm-test-debug-exit VALUE");
        return ExitCode::from(2);
    };
    // SAFETY: ioperm(2) only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(PORT.into(), 4, 1) } != 0 {
        eprintln!("ioperm: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    // SAFETY: `out` to the port ioperm just allowed; it touches no memory.
    unsafe {
        std::arch::asm!("out dx, eax", in("dx") PORT, in("eax") value, options(nomem, nostack));
    }
    // The VM ends on the write; reaching here means nothing listened.
    eprintln!("the write to port {PORT:#x} did not end the VM");
    ExitCode::from(1)
}
