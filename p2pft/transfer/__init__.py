"""
The transfer layer: what travels inside the encrypted records.

    sender                               receiver
    OFFER {entries, files, bytes}  ->
    ENTRIES [[path, kind, size, mode, mtime], ...]  ->   (until all entries; mtime in ns
                                                          where both announced "mtime-ns")
                                   <-    HAVE {file, from, hashes, complete}*
                                   <-    ACCEPT {}      (or REJECT {message})
    per file:  FILE {file, offset} | FILE {file, skip}  ->
               DATA bytes ... DATA ->                    (flow-controlled)
               FILE_END {size} ->                        (checked, moved into place)
    END {files, bytes}             ->
                                   <-    ACK {files, bytes}   (after syncing the disk)

HAVE is the resume: the receiver's block hashes (L{resume}) of the partial
data it kept, or of a complete file already there.  The sender reads its own
file while the hashes match and continues after the matching blocks, or
skips a file that is already complete and identical.

Either side may send ABORT {message} and close.  The sender succeeds only on
an ACK that matches what it sent; the receiver only after every file was
verified and moved into place and the disk synced.  A connection that ends
any other way is a failure on both sides, whatever was received; the
receiver keeps its partial data for the next attempt.

L{Sender} and L{Receiver} talk to a channel (L{p2pft.channel}) only through
C{attach}, C{send}, C{registerProducer}, C{unregisterProducer}, C{close} and
C{abort}, so tests drive them with a fake channel.  Disk reads that may take
long (hashing for a resume) go through C{run_blocking}, a thread in real use.

The modules, by responsibility:
  records      the record kinds and the JSON control-message codec
  endpoint     what both sides share: the channel, aborts, endings, dispatch
  offer        L{Offer}, L{Result}, reading an offer (OFFER, ENTRIES)
  sender       L{Sender}, L{StreamSender}, L{TextSender}; pacing: the rate limit
  outgoing     the sender's files: which comes next, reading the one being sent
  receiver     L{Receiver}; destination: a folder on disk, or standard output
  intake       the receiver's files: FILE, DATA, FILE_END checked, written, placed
  resume       block hashes, HAVE, and every rule of resuming
  manifest     the entries and their checks (tree: their compact storage)
  scan         the sender's manifest, from the paths it was given
  names fsprobe store placing sink text pipes   names, the output folder,
                                        placing, disk writes, text messages,
                                        standard input/output
"""

from ..errors import Declined, TransferFailed, UnsafeName
from .offer import Offer, Result
from .pipes import FDReader, is_stream
from .receiver import Receiver, StdoutReceiver
from .sender import Sender, StreamSender, TextSender

__all__ = ["Sender", "StreamSender", "TextSender", "Receiver", "StdoutReceiver", "Offer", "Result",
           "TransferFailed", "Declined", "UnsafeName", "FDReader", "is_stream"]
