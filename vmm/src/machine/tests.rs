//! Every transition of docs/QMP.md, without KVM.

use super::*;
use Effect::*;

fn machine(no_shutdown: bool, no_reboot: bool, paused: bool) -> Machine {
    let policy = Policy {
        no_shutdown,
        no_reboot,
        timeout: Some(7),
    };
    Machine::new(policy, paused)
}

fn running() -> Machine {
    machine(false, false, false)
}

fn kept() -> Machine {
    machine(true, false, false)
}

fn ok(m: &mut Machine, i: Input) -> Vec<Effect> {
    m.handle(i).expect("accepted")
}

/// `cont` from a stopped state: the vcpus resume, RESUME, state running.
fn cont_resumes(m: &mut Machine) {
    assert_eq!(ok(m, Input::Cont), vec![Resume, Emit(QmpEvent::Resume)]);
    assert_eq!(m.state(), RunState::Running);
}

fn shutdown(c: Cause) -> Effect {
    Emit(QmpEvent::Shutdown(c))
}

#[test]
fn starts_running_or_in_prelaunch() {
    assert_eq!(running().state(), RunState::Running);
    assert_eq!(machine(false, false, true).state(), RunState::Prelaunch);
    assert_eq!(running().generation(), 0);
}

#[test]
fn stop_and_cont() {
    let mut m = running();
    assert_eq!(ok(&mut m, Input::Stop), vec![Pause, Emit(QmpEvent::Stop)]);
    assert_eq!(m.state(), RunState::Paused);
    // Idempotent: no second STOP.
    assert_eq!(ok(&mut m, Input::Stop), vec![]);
    cont_resumes(&mut m);
    assert_eq!(ok(&mut m, Input::Cont), vec![], "cont while running");
}

#[test]
fn prelaunch_cont_starts_and_stop_does_nothing() {
    let mut m = machine(false, false, true);
    assert_eq!(ok(&mut m, Input::Stop), vec![]);
    assert_eq!(m.state(), RunState::Prelaunch);
    cont_resumes(&mut m);
}

#[test]
fn system_reset_rebuilds_running_or_into_prelaunch() {
    let mut m = running();
    let reset = Emit(QmpEvent::Reset(Cause::HostQmpSystemReset));
    assert_eq!(
        ok(&mut m, Input::SystemReset),
        vec![reset.clone(), Rebuild { run: true }]
    );
    assert_eq!(m.state(), RunState::Running);
    assert_eq!(m.generation(), 1);
    ok(&mut m, Input::Stop);
    assert_eq!(
        ok(&mut m, Input::SystemReset),
        vec![reset, Rebuild { run: false }]
    );
    assert_eq!(m.state(), RunState::Prelaunch);
    assert_eq!(m.generation(), 2);
}

#[test]
fn guest_reset_rebuilds_or_exits_with_no_reboot() {
    let mut m = running();
    assert_eq!(
        ok(&mut m, Input::GuestReset),
        vec![
            Emit(QmpEvent::Reset(Cause::GuestReset)),
            Rebuild { run: true }
        ]
    );
    assert_eq!(m.generation(), 1);
    let mut m = machine(false, true, false);
    assert_eq!(
        ok(&mut m, Input::GuestReset),
        vec![shutdown(Cause::GuestReset), Exit(Outcome::RebootRefused)]
    );
    assert_eq!(m.generation(), 0, "no rebuild");
    // --no-reboot with --no-shutdown: kept in shutdown.
    let mut m = machine(true, true, false);
    assert_eq!(
        ok(&mut m, Input::GuestReset),
        vec![shutdown(Cause::GuestReset), Pause, Emit(QmpEvent::Stop)]
    );
    assert_eq!(m.state(), RunState::Shutdown);
}

#[test]
fn guest_poweroff_exits_or_is_kept() {
    let mut m = running();
    assert_eq!(
        ok(&mut m, Input::GuestPowerOff),
        vec![shutdown(Cause::GuestShutdown), Exit(Outcome::PowerOff)]
    );
    assert!(m.is_exiting());
    let mut m = kept();
    assert_eq!(
        ok(&mut m, Input::GuestPowerOff),
        vec![shutdown(Cause::GuestShutdown), Pause, Emit(QmpEvent::Stop)]
    );
    assert_eq!(m.state(), RunState::Shutdown);
    assert!(!m.is_exiting());
}

#[test]
fn guest_panic_exits_or_is_kept() {
    let mut m = running();
    assert_eq!(
        ok(&mut m, Input::GuestPanic),
        vec![
            Emit(QmpEvent::GuestPanicked(PanicAction::Poweroff)),
            shutdown(Cause::GuestPanic),
            Exit(Outcome::Panicked)
        ]
    );
    let mut m = kept();
    assert_eq!(
        ok(&mut m, Input::GuestPanic),
        vec![
            Emit(QmpEvent::GuestPanicked(PanicAction::Pause)),
            Pause,
            Emit(QmpEvent::Stop)
        ]
    );
    assert_eq!(m.state(), RunState::GuestPanicked);
}

#[test]
fn isa_debug_exit_ends_the_process_at_once_with_qemus_status() {
    for mut m in [running(), kept()] {
        assert_eq!(
            ok(&mut m, Input::GuestDebugExit(3)),
            vec![Exit(Outcome::DebugExit(3))]
        );
        assert!(m.is_exiting());
    }
    assert_eq!(Outcome::DebugExit(3).exit_code(), 7);
    assert_eq!(Outcome::DebugExit(0).exit_code(), 1);
    assert_eq!(
        Outcome::DebugExit(0x80).exit_code(),
        1,
        "low 8 bits, as exit(3)"
    );
    assert_eq!(Outcome::DebugExit(3).message(), None, "QEMU prints nothing");
}

#[test]
fn the_end_of_a_run_command_ends_the_process() {
    for mut m in [running(), kept()] {
        assert_eq!(
            ok(&mut m, Input::CommandEnded),
            vec![Exit(Outcome::CommandEnded)]
        );
        assert!(m.is_exiting());
    }
}

#[test]
fn vm_failure_exits_1_or_is_internal_error() {
    let mut m = running();
    let fx = ok(&mut m, Input::VmFailed("vcpu0 panicked: boom".into()));
    assert_eq!(
        fx,
        vec![Exit(Outcome::Failed("vcpu0 panicked: boom".into()))]
    );
    assert_eq!(Outcome::Failed(String::new()).exit_code(), 1);
    let mut m = kept();
    assert_eq!(
        ok(&mut m, Input::VmFailed("x".into())),
        vec![Report("x".into()), Pause, Emit(QmpEvent::Stop)]
    );
    assert_eq!(m.state(), RunState::InternalError);
    // A failure while paused: no STOP (the vcpus were stopped already).
    let mut m = kept();
    ok(&mut m, Input::Stop);
    assert_eq!(
        ok(&mut m, Input::VmFailed("x".into())),
        vec![Report("x".into()), Pause]
    );
    assert_eq!(m.state(), RunState::InternalError);
}

#[test]
fn stopped_guest_needs_a_reset() {
    for input in [
        Input::GuestPowerOff,
        Input::GuestPanic,
        Input::VmFailed("x".into()),
    ] {
        let mut m = kept();
        ok(&mut m, input.clone());
        assert!(m.state().needs_reset(), "{input:?}");
        assert_eq!(m.handle(Input::Cont), Err(Refusal::ResetRequired));
        assert_eq!(
            Refusal::ResetRequired.to_string(),
            "Resetting the Virtual Machine is required"
        );
        // Further guest inputs from the dead VM are ignored.
        for late in [
            Input::GuestPowerOff,
            Input::GuestReset,
            Input::GuestPanic,
            Input::VmFailed("y".into()),
        ] {
            assert_eq!(ok(&mut m, late), vec![]);
        }
        // system_reset, then cont, boots again.
        assert_eq!(
            ok(&mut m, Input::SystemReset),
            vec![
                Emit(QmpEvent::Reset(Cause::HostQmpSystemReset)),
                Rebuild { run: false }
            ]
        );
        assert_eq!(m.state(), RunState::Prelaunch);
        cont_resumes(&mut m);
    }
}

#[test]
fn host_ends() {
    let cases = [
        (
            Input::Signal(libc::SIGTERM),
            vec![
                shutdown(Cause::HostSignal),
                Exit(Outcome::Signal(libc::SIGTERM)),
            ],
        ),
        (Input::Timeout, vec![Pause, Exit(Outcome::Timeout(7))]),
        (
            Input::ConsoleQuit,
            vec![shutdown(Cause::HostUi), Exit(Outcome::Quit)],
        ),
        (
            Input::Quit,
            vec![shutdown(Cause::HostQmpQuit), Exit(Outcome::QmpQuit)],
        ),
    ];
    for (input, want) in cases {
        for mut m in [running(), kept(), machine(false, false, true)] {
            assert_eq!(ok(&mut m, input.clone()), want, "{input:?}");
            assert!(m.is_exiting());
            // Nothing happens after the end is decided.
            assert_eq!(ok(&mut m, Input::GuestPowerOff), vec![]);
            assert_eq!(ok(&mut m, Input::Signal(libc::SIGINT)), vec![]);
            assert_eq!(ok(&mut m, Input::SystemReset), vec![]);
        }
    }
}

#[test]
fn powerdown_presses_the_button_in_any_state() {
    for mut m in [running(), machine(false, false, true)] {
        assert_eq!(
            ok(&mut m, Input::SystemPowerdown),
            vec![Emit(QmpEvent::Powerdown), PressPowerButton]
        );
    }
}

#[test]
fn exit_codes_and_messages() {
    assert_eq!(Outcome::PowerOff.exit_code(), 0);
    assert_eq!(Outcome::RebootRefused.exit_code(), 0);
    assert_eq!(Outcome::Quit.exit_code(), 0);
    assert_eq!(Outcome::QmpQuit.exit_code(), 0);
    assert_eq!(Outcome::Timeout(5).exit_code(), 124);
    assert_eq!(Outcome::Signal(libc::SIGTERM).exit_code(), 143);
    assert_eq!(Outcome::Signal(libc::SIGINT).exit_code(), 130);
    assert_eq!(Outcome::Failed("x".into()).exit_code(), 1);
    assert_eq!(Outcome::Panicked.exit_code(), 1);
    assert!(Outcome::PowerOff.message().is_none());
    assert!(Outcome::Signal(libc::SIGTERM)
        .message()
        .is_some_and(|m| m.contains("SIGTERM")));
    assert!(Outcome::Failed("vcpu0 panicked".into())
        .message()
        .is_some_and(|m| m.contains("the VM failed: vcpu0 panicked")));
}

#[test]
fn run_state_names() {
    assert_eq!(RunState::GuestPanicked.as_str(), "guest-panicked");
    assert_eq!(RunState::InternalError.as_str(), "internal-error");
    assert!(RunState::Shutdown.needs_reset());
    assert!(!RunState::Paused.needs_reset());
    assert!(!RunState::Prelaunch.needs_reset());
}
