//! The identity in a client certificate the TLS layer has verified: the
//! subject's common name, else the first DNS, e-mail or URI subject
//! alternative name.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

pub fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|a| a.as_str().ok())
        .filter(|s| !s.is_empty())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
            Some(s.to_string())
        }
        _ => None,
    })
}
