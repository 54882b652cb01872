"""edgekv.runtime: the embedded runtime that ships to a device (numpy + onnxruntime +
tokenizers + jinja2, never torch or transformers).

    from edgekv.runtime import Engine
    engine = Engine.load("bundle/", device="cpu", budget="1.5GiB")
    for piece in engine.generate("Once upon a time", max_new_tokens=64):
        print(piece, end="", flush=True)
    print(engine.last_stats.summary())
"""

from edgekv.runtime.bundle import Bundle, BundleError, open_bundle
from edgekv.runtime.devices import DeviceError, DeviceProfile, list_devices, load_device, resolve_device
from edgekv.runtime.engine import Engine, EngineError, Generation, GenerationStats
from edgekv.runtime.planner import Plan, PlanError, parse_size, plan
from edgekv.runtime.sampler import Sampler

__all__ = ["Engine", "EngineError", "Generation", "GenerationStats", "Bundle", "BundleError", "open_bundle",
           "DeviceError", "DeviceProfile", "list_devices", "load_device", "resolve_device", "Plan",
           "PlanError", "parse_size", "plan", "Sampler"]
