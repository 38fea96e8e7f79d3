//! coturn's `turnutils_uclient` and `turnutils_peer`: whether they are installed, and the
//! totals of the client's summary.

use crate::required_tool;

/// Whether `turnutils_uclient` and `turnutils_peer` (Debian package coturn) are installed;
/// see [`required_tool`] for what happens when they are not.
pub fn tools_present(test: &str) -> bool {
    let uclient = required_tool("turnutils_uclient", test).is_some();
    let peer = required_tool("turnutils_peer", test).is_some();
    uclient && peer
}

/// The totals of `turnutils_uclient`'s summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Messages sent (`tot_send_msgs`).
    pub sent: u64,
    /// Messages received back (`tot_recv_msgs`).
    pub received: u64,
}

impl Totals {
    /// The totals of the last summary line in `output` (the client's stdout).
    pub fn parse(output: &str) -> Option<Totals> {
        let line = output
            .lines()
            .rev()
            .find(|l| l.contains("tot_send_msgs="))?;
        let number = |key: &str| -> Option<u64> {
            let rest = &line[line.find(key)? + key.len()..];
            rest.split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        Some(Totals {
            sent: number("tot_send_msgs=")?,
            received: number("tot_recv_msgs=")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_summary_line_counts() {
        let out = "2: : start_mclient: msz=10, tot_send_msgs=35, tot_recv_msgs=34\n8: : start_mclient: tot_send_msgs=20000, tot_recv_msgs=19990\n";
        let t = Totals::parse(out).unwrap();
        assert_eq!((t.sent, t.received), (20000, 19990));
    }
}
