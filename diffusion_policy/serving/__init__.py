"""Serving a policy to robots over the network: ``dp-serve`` and its client.

- ``protocol``: the wire format (msgpack over websockets, numpy arrays without pickle).
- ``client``: :class:`~diffusion_policy.serving.client.RemotePolicy` (numpy, msgpack, websockets;
  no torch), a drop-in for a local policy in the receding-horizon controller.
- ``server``: :class:`~diffusion_policy.serving.server.PolicyServer` (torch).

Nothing is imported here, so ``import diffusion_policy.serving.client`` stays light.
"""
