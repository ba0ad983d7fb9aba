#!/usr/bin/perl
# An independent DKIM signer for the tests: Perl's Mail::DKIM (Debian libmail-dkim-perl).
# Reads a message on stdin (LF or CRLF), prints the DKIM-Signature field (one line) on stdout.
# usage: dkim_sign.pl KEYFILE DOMAIN SELECTOR [ALGORITHM [METHOD [HEADERS [EXPIRATION]]]]
use strict;
use warnings;
use Mail::DKIM::Signer;
use Mail::DKIM::PrivateKey;

my ($keyfile, $domain, $selector, $algorithm, $method, $headers, $expiration) = @ARGV;
die "usage: $0 KEYFILE DOMAIN SELECTOR [ALG [METHOD [HEADERS [EXPIRATION]]]]\n"
    unless defined $selector;
$algorithm ||= 'rsa-sha256';
$method ||= 'relaxed/relaxed';
my $key_type = $algorithm =~ /^ed25519/ ? 'ed25519' : 'rsa';
my $signer = Mail::DKIM::Signer->new(
    Key    => Mail::DKIM::PrivateKey->load(File => $keyfile, Type => $key_type),
    Policy => sub {
        my $signer = shift;
        my %sig = (
            Algorithm => $algorithm,
            Method    => $method,
            Domain    => $domain,
            Selector  => $selector,
            Timestamp => time(),
            Headers   => (defined $headers && length $headers) ? $headers : $signer->headers,
        );
        $sig{Expiration} = $expiration if defined $expiration && length $expiration;
        $signer->add_signature(Mail::DKIM::Signature->new(%sig));
        return;
    },
);
binmode STDIN;
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $signer->PRINT($line);
}
$signer->CLOSE;
my $text = $signer->signature->as_string;
$text =~ s/\r?\n[ \t]*/ /g;
print "$text\n";
