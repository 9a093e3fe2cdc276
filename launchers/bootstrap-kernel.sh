#!/bin/sh
# Entry point of a kernel container: starts the launcher for KERNEL_LANGUAGE with what the gateway's
# container provisioner put in the environment.
#
#   KERNEL_LANGUAGE      python (the default); any other language exits 2 with a message
#   KERNEL_ID            the kernel's id                          -> --kernel-id
#   RESPONSE_ADDRESS     host:port of the gateway's listener      -> --response-address
#   PUBLIC_KEY           the gateway's X25519 public key (base64) -> --public-key
#   PORT_RANGE           'low..high', or '0..0'/empty for any     -> --port-range
#   KERNEL_CLASS_NAME    default ipykernel.ipkernel.IPythonKernel -> --kernel-class-name
#   KERNEL_LAUNCH_TOKEN  the per-kernel launch token; the launcher reads (and unsets) it itself
#   TRANSPORT_ENCRYPTION 'curve': CurveZMQ-encrypt the kernel's channels   -> --curve
#   KERNEL_GATEWAY_PYTHON  the interpreter to use; else the one `kernel-gateway image-bootstrap`
#                        recorded in ./kernel-python beside this script; else python3 on PATH
#
# The kernel listens on 0.0.0.0 inside the container. Extra arguments are passed to the launcher.
set -eu

here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)

language=$(printf '%s' "${KERNEL_LANGUAGE:-python}" | tr '[:upper:]' '[:lower:]')
case "$language" in
    python | python3) launcher="$here/launch_ipykernel.py" ;;
    *)
        echo "bootstrap-kernel: KERNEL_LANGUAGE='${KERNEL_LANGUAGE}' is not supported by this image" \
             "(supported: python)" >&2
        exit 2
        ;;
esac

missing=""
for name in KERNEL_ID RESPONSE_ADDRESS PUBLIC_KEY KERNEL_LAUNCH_TOKEN; do
    eval "value=\${$name:-}"
    [ -n "$value" ] || missing="$missing $name"
done
if [ -n "$missing" ]; then
    echo "bootstrap-kernel: missing environment variable(s):$missing (set by the gateway's provisioner)" >&2
    exit 2
fi

python="${KERNEL_GATEWAY_PYTHON:-}"
if [ -z "$python" ] && [ -r "$here/kernel-python" ]; then
    python=$(head -n 1 "$here/kernel-python")
fi
if [ -z "$python" ]; then
    python=$(command -v python3 || command -v python || true)
fi
if [ -z "$python" ] || ! command -v "$python" >/dev/null 2>&1; then
    echo "bootstrap-kernel: no Python interpreter found (set KERNEL_GATEWAY_PYTHON)" >&2
    exit 2
fi

# Kernels may run as any uid (KERNEL_UID): give IPython and Jupyter a writable home.
if [ -z "${HOME:-}" ] || [ ! -w "${HOME}" ]; then
    HOME="${TMPDIR:-/tmp}/kernel-home-$(id -u)"
    mkdir -p "$HOME"
    export HOME
fi

exec "$python" "$launcher" \
    --kernel-id "$KERNEL_ID" \
    --response-address "$RESPONSE_ADDRESS" \
    --public-key "$PUBLIC_KEY" \
    --port-range "${PORT_RANGE:-}" \
    --kernel-class-name "${KERNEL_CLASS_NAME:-ipykernel.ipkernel.IPythonKernel}" \
    --ip 0.0.0.0 \
    ${TRANSPORT_ENCRYPTION:+--curve} \
    "$@"
