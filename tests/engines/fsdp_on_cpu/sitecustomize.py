"""Put first on PYTHONPATH of a launch with scripts/accelerate/fsdp.yaml on CPU processes (gloo):
accelerate serves FSDP on accelerators only and falls back to plain multi-process CPU, but torch's
fully_shard runs on CPU. After each Accelerator is built, its state is set to what the FSDP
config builds on GPUs: distributed type FSDP with the plugin that config's environment
(FSDP_VERSION=2, FSDP_AUTO_WRAP_POLICY, ...) describes, so `prepare`, the project's sharded
checkpoints and its gathered exports run the GPU path."""
import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    _build = accelerate.Accelerator.__init__

    def _fsdp_on_cpu(self, *args, **kwargs):
        _build(self, *args, **kwargs)
        plugin = FullyShardedDataParallelPlugin()
        if self.state.mixed_precision != "no":
            plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what accelerate does itself
        self.state.fsdp_plugin = plugin

    accelerate.Accelerator.__init__ = _fsdp_on_cpu
