//! minivmm: a small KVM virtual machine monitor.
//!
//! The binary parses its command line ([`cli`]), then [`vmm::run`] builds the VM
//! ([`builder`]: memory, kernel, ACPI, devices, vcpus) and runs its lifecycle until
//! the guest powers off, the VM fails, or the user stops it.

pub mod acpi;
pub mod agent;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpu;
pub mod device_manager;
pub mod error;
pub mod hvc;
pub mod layout;
pub mod machine;
pub mod memory;
pub mod mptable;
pub mod port_watch;
pub mod qmp_event;
pub mod run;
pub mod runtime;
pub mod share;
pub mod terminal;
pub mod vcpu;
pub mod vmm;
