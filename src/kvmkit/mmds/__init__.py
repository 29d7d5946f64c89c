"""The microVM metadata service (Firecracker's MMDS, docs/mmds/mmds-user-guide.md and
mmds-design.md), pure code:

- `store`: the JSON data store the API's `/mmds` fills (size limit, JSON Merge Patch),
  its configuration (`/mmds/config`) and V2 session tokens;
- `http`: the HTTP/1.1 subset the guest speaks to it (GET, PUT /latest/api/token) and the
  answers in Firecracker's words (JSON or IMDS text);
- `stack`: the minimal ARP + IPv4 + TCP endpoint (Firecracker's "Dumbo") that a virtio-net
  device hands the guest's frames for the MMDS address to and asks for frames to inject.

Nothing here touches a device, a socket or the tap: the virtio-net device calls
`MmdsStack.intercept` for each frame the guest sends and `MmdsStack.next_frame` whenever it
can give the guest a frame.
"""
