"""The adaptation loop on the gateway's side: the validation gate a new model version passes
before it takes traffic (``gateway.adaptation.gate``, its result ``gate_result``) and staged
rollouts.

Modules are imported by name, not re-exported here: the gate loads ONNX Runtime sessions and
the feature contracts, which what only reads a gate's result (the repository's check) or
drives a rollout has no need to import.
"""
