// Package devicerunner is the devicerunner App ABI v1 for Go (>= 1.24,
// GOOS=wasip1 GOARCH=wasm): the host imports as //go:wasmimport functions,
// errors as Go errors, typed kv and telemetry helpers. No dependencies.
//
// The app exports dr_init, dr_tick and dr_health with //go:wasmexport and is
// built as a WASI reactor:
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o app.wasm .
//
// Go's runtime needs the wasi capability (clock, poll_oneoff, fd_write...).
package devicerunner

import (
	"fmt"
	"math"
	"unsafe"
)

//go:wasmimport log write
func logWrite(level int32, ptr unsafe.Pointer, n int32) int32

//go:wasmimport clock now_ms
func clockNowMs() int64

//go:wasmimport clock monotonic_us
func clockMonotonicUs() int64

//go:wasmimport sensors find
func sensorsFind(ptr unsafe.Pointer, n int32) int32

//go:wasmimport sensors count
func sensorsCount() int32

//go:wasmimport sensors name
func sensorsName(id int32, out unsafe.Pointer, capacity int32) int32

//go:wasmimport sensors read
func sensorsRead(id int32, out unsafe.Pointer) int32

//go:wasmimport sensors read_batch
func sensorsReadBatch(id int32, out unsafe.Pointer, maxSamples int32) int32

//go:wasmimport actuators find
func actuatorsFind(ptr unsafe.Pointer, n int32) int32

//go:wasmimport actuators set
func actuatorsSet(id int32, value float64) int32

//go:wasmimport kv get
func kvGet(kptr unsafe.Pointer, klen int32, vptr unsafe.Pointer, vcap int32) int32

//go:wasmimport kv set
func kvSet(kptr unsafe.Pointer, klen int32, vptr unsafe.Pointer, vlen int32) int32

//go:wasmimport kv delete
func kvDelete(kptr unsafe.Pointer, klen int32) int32

//go:wasmimport telemetry publish
func telemetryPublish(nptr unsafe.Pointer, nlen int32, pptr unsafe.Pointer, plen int32) int32

// Error is an expected failure reported by the host (docs/abi.md, "Error codes").
type Error int32

const (
	ErrNotFound    Error = -1
	ErrBounds      Error = -2
	ErrQuota       Error = -3
	ErrStale       Error = -4
	ErrOffline     Error = -5
	ErrRateLimited Error = -6
	ErrTooLarge    Error = -7
	ErrBufTooSmall Error = -8
	ErrInvalid     Error = -9
	ErrIO          Error = -10
)

var errorNames = map[Error]string{
	ErrNotFound: "not found", ErrBounds: "out of bounds", ErrQuota: "quota exceeded",
	ErrStale: "stale", ErrOffline: "offline", ErrRateLimited: "rate limited",
	ErrTooLarge: "too large", ErrBufTooSmall: "buffer too small", ErrInvalid: "invalid argument",
	ErrIO: "host I/O error",
}

func (e Error) Error() string {
	if s, ok := errorNames[e]; ok {
		return fmt.Sprintf("devicerunner: %s (%d)", s, int32(e))
	}
	return fmt.Sprintf("devicerunner: error %d", int32(e))
}

// Code is the host's code for err, to return from dr_tick (-100 for other errors).
func Code(err error) int32 {
	if err == nil {
		return 0
	}
	if e, ok := err.(Error); ok {
		return int32(e)
	}
	return -100
}

func check(rc int32) (int32, error) {
	if rc < 0 {
		return 0, Error(rc)
	}
	return rc, nil
}

func strPtr(s string) (unsafe.Pointer, int32) {
	if len(s) == 0 {
		return nil, 0
	}
	return unsafe.Pointer(unsafe.StringData(s)), int32(len(s))
}

func bytesPtr(b []byte) (unsafe.Pointer, int32) {
	if len(b) == 0 {
		return nil, 0
	}
	return unsafe.Pointer(&b[0]), int32(len(b))
}

// -- log --

type Level int32

const (
	Debug      Level = 0
	Info       Level = 1
	Warn       Level = 2
	ErrorLevel Level = 3
)

// Log writes one line (cut at 1 KiB by the host).
func Log(level Level, msg string) error {
	p, n := strPtr(msg)
	_, err := check(logWrite(int32(level), p, n))
	return err
}

// Logf formats and logs a line.
func Logf(level Level, format string, args ...any) { _ = Log(level, fmt.Sprintf(format, args...)) }

// -- clock --

func NowMs() int64       { return clockNowMs() }
func MonotonicUs() int64 { return clockMonotonicUs() }

// -- sensors and actuators --

// Sample is a reading; Fresh is false when the host said ErrStale (the value
// is still the newest it has).
type Sample struct {
	Value float64
	Fresh bool
}

type Sensor int32

func FindSensor(name string) (Sensor, error) {
	p, n := strPtr(name)
	id, err := check(sensorsFind(p, n))
	return Sensor(id), err
}

func SensorCount() int { return int(sensorsCount()) }

func (s Sensor) Name() (string, error) {
	var buf [64]byte
	n, err := check(sensorsName(int32(s), unsafe.Pointer(&buf[0]), int32(len(buf))))
	if err != nil {
		return "", err
	}
	return string(buf[:n]), nil
}

func (s Sensor) Read() (Sample, error) {
	var v float64
	switch rc := sensorsRead(int32(s), unsafe.Pointer(&v)); rc {
	case 0:
		return Sample{v, true}, nil
	case int32(ErrStale):
		return Sample{v, false}, nil
	default:
		return Sample{}, Error(rc)
	}
}

// ReadBatch fills out with unread samples, oldest first; how many.
func (s Sensor) ReadBatch(out []float64) (int, error) {
	if len(out) == 0 {
		return 0, nil
	}
	n, err := check(sensorsReadBatch(int32(s), unsafe.Pointer(&out[0]), int32(min(len(out), 4096))))
	return int(n), err
}

type Actuator int32

func FindActuator(name string) (Actuator, error) {
	p, n := strPtr(name)
	id, err := check(actuatorsFind(p, n))
	return Actuator(id), err
}

func (a Actuator) Set(value float64) error {
	_, err := check(actuatorsSet(int32(a), value))
	return err
}

// -- kv --

// KvGet copies the value of key into buf; its length.
func KvGet(key string, buf []byte) (int, error) {
	kp, kn := strPtr(key)
	vp, vn := bytesPtr(buf)
	n, err := check(kvGet(kp, kn, vp, vn))
	return int(n), err
}

func KvSet(key string, value []byte) error {
	kp, kn := strPtr(key)
	vp, vn := bytesPtr(value)
	_, err := check(kvSet(kp, kn, vp, vn))
	return err
}

func KvDelete(key string) error {
	kp, kn := strPtr(key)
	_, err := check(kvDelete(kp, kn))
	return err
}

// KvGetFloat64 reads a value stored by KvSetFloat64 (8 bytes, little-endian).
func KvGetFloat64(key string) (float64, error) {
	var b [8]byte
	n, err := KvGet(key, b[:])
	if err == ErrBufTooSmall || (err == nil && n != 8) {
		return 0, ErrInvalid
	}
	if err != nil {
		return 0, err
	}
	return math.Float64frombits(le64(b)), nil
}

func KvSetFloat64(key string, v float64) error {
	b := put64(math.Float64bits(v))
	return KvSet(key, b[:])
}

func KvGetInt64(key string) (int64, error) {
	var b [8]byte
	n, err := KvGet(key, b[:])
	if err == ErrBufTooSmall || (err == nil && n != 8) {
		return 0, ErrInvalid
	}
	if err != nil {
		return 0, err
	}
	return int64(le64(b)), nil
}

func KvSetInt64(key string, v int64) error {
	b := put64(uint64(v))
	return KvSet(key, b[:])
}

func le64(b [8]byte) uint64 {
	var v uint64
	for i := 7; i >= 0; i-- {
		v = v<<8 | uint64(b[i])
	}
	return v
}

func put64(v uint64) (b [8]byte) {
	for i := range b {
		b[i] = byte(v >> (8 * i))
	}
	return b
}

// -- telemetry --

// Publish queues payload (at most 4 KiB) under name ([A-Za-z0-9_.-]{1,64}).
func Publish(name string, payload []byte) error {
	np, nn := strPtr(name)
	pp, pn := bytesPtr(payload)
	_, err := check(telemetryPublish(np, nn, pp, pn))
	return err
}

func PublishString(name, payload string) error { return Publish(name, []byte(payload)) }
