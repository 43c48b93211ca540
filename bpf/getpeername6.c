/* cgroup/getpeername6, attached to each captured pod's cgroup: getpeername4's twin for IPv6
 * sockets: one connected to [::1] or ::ffff:127.0.0.1 at the DNS proxy's port (15053) reports the
 * resolver it dialled as its peer, at Envoy's outbound port (15001) the destination it dialled.
 */
#include "capture.h"

int getpeername6(struct bpf_sock_addr *ctx)
{
	show_dialled6(ctx);
	return 1;
}
