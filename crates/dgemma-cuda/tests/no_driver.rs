//! Opening a device must never panic. On a machine without the CUDA driver (CI, this
//! workspace's build machine) it must return `CudaError::NoDriver`.

use dgemma_cuda::{CudaError, Device};

#[test]
fn open_without_a_driver_is_an_error_not_a_panic() {
    let result = std::panic::catch_unwind(|| Device::open(0, dgemma::kernels::FATBIN));
    let result = result.expect("Device::open panicked");
    if Device::driver_present() {
        // A GPU host: any outcome but a panic is fine here; gpu_kernels.rs checks the rest.
        eprintln!("CUDA driver present; Device::open(0) -> {:?}", result.as_ref().map(|d| d.name()));
    } else {
        match result {
            Err(CudaError::NoDriver) => {}
            other => panic!("expected CudaError::NoDriver, got {other:?}"),
        }
        assert_eq!(Device::count(), 0);
    }
}

#[test]
fn errors_are_reported_in_order_of_cause() {
    // No driver beats an empty image; with a driver, the empty image is the error.
    let result = Device::open(0, &[]);
    if Device::driver_present() {
        assert!(matches!(result, Err(CudaError::NoKernels)), "{result:?}");
    } else {
        assert!(matches!(result, Err(CudaError::NoDriver)), "{result:?}");
    }
    let msg = CudaError::NoDriver.to_string();
    assert!(msg.contains("libcuda"), "{msg}");
}
