//! Every answer keygate can give locally: its code, HTTP status and default messages.
//! This table is the one place where a code's status and wording are defined.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    TokenMissing,
    MalformedApiKey,
    ApiKeyChecksumMismatch,
    IncompleteApiKey,
    ConflictingCredentials,
    InvalidApiKey,
    ApiKeyExpired,
    ApiKeyNoUser,
    TokenExpired,
    InvalidToken,
    SessionExpired,
    Forbidden,
    TenantForbidden,
    OriginNotAllowed,
    WebSessionRequired,
    ApiKeyManagementForbidden,
    ApiKeyDeleteForbidden,
    BudgetExhausted,
    RateLimitExceeded,
    KeysetUnavailable,
    AmbiguousPath,
}

/// Language of the default messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Language {
    #[default]
    En,
    Es,
}

impl Language {
    /// Each language by its configuration name.
    pub const NAMES: &'static [(&'static str, Language)] =
        &[("en", Language::En), ("es", Language::Es)];
}

/// The counters of every request's outcome; both hosts name them
/// `keygate.<filter name>.<counter>`, like the key source's (`keysource::host::Counter`).
pub const ALLOWED_COUNTER: &str = "allowed";
pub const DENIED_COUNTER: &str = "denied";

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::TokenMissing,
        ErrorCode::MalformedApiKey,
        ErrorCode::ApiKeyChecksumMismatch,
        ErrorCode::IncompleteApiKey,
        ErrorCode::ConflictingCredentials,
        ErrorCode::InvalidApiKey,
        ErrorCode::ApiKeyExpired,
        ErrorCode::ApiKeyNoUser,
        ErrorCode::TokenExpired,
        ErrorCode::InvalidToken,
        ErrorCode::SessionExpired,
        ErrorCode::Forbidden,
        ErrorCode::TenantForbidden,
        ErrorCode::OriginNotAllowed,
        ErrorCode::WebSessionRequired,
        ErrorCode::ApiKeyManagementForbidden,
        ErrorCode::ApiKeyDeleteForbidden,
        ErrorCode::BudgetExhausted,
        ErrorCode::RateLimitExceeded,
        ErrorCode::KeysetUnavailable,
        ErrorCode::AmbiguousPath,
    ];

    /// The code as it appears in JSON bodies, logs and stats.
    pub fn as_str(self) -> &'static str {
        self.entry().0
    }

    /// The name of the counter of denials with this code (`DENIED_COUNTER` counts them all).
    pub fn denied_counter(self) -> String {
        format!("{DENIED_COUNTER}.{}", self.as_str().to_ascii_lowercase())
    }

    pub fn status(self) -> u32 {
        self.entry().1
    }

    pub fn default_message(self, language: Language) -> &'static str {
        let (_, _, en, es) = self.entry();
        match language {
            Language::En => en,
            Language::Es => es,
        }
    }

    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == name)
    }

    /// (code, status, English message, Spanish message)
    fn entry(self) -> (&'static str, u32, &'static str, &'static str) {
        use ErrorCode::*;
        match self {
            TokenMissing => (
                "TOKEN_MISSING",
                401,
                "No API key or valid session was provided.",
                "No se envió una API key ni una sesión válida.",
            ),
            MalformedApiKey => (
                "MALFORMED_API_KEY",
                401,
                "The API key is malformed or has an unknown prefix.",
                "La API key tiene un formato inválido o un prefijo desconocido.",
            ),
            ApiKeyChecksumMismatch => (
                "API_KEY_CHECKSUM_MISMATCH",
                401,
                "The API key fails its checksum: it was mistyped or cut short.",
                "La API key no supera su suma de verificación: está mal escrita o incompleta.",
            ),
            IncompleteApiKey => (
                "INCOMPLETE_API_KEY",
                401,
                "Both the key id and the key secret are required.",
                "Se requieren el ID y el secreto de la API key.",
            ),
            ConflictingCredentials => (
                "CONFLICTING_CREDENTIALS",
                401,
                "The request carries more than one different credential.",
                "La solicitud incluye más de una credencial distinta.",
            ),
            InvalidApiKey => (
                "INVALID_API_KEY",
                401,
                "The API key is unknown, revoked or its secret is wrong.",
                "La API key no existe, fue revocada o el secreto es incorrecto.",
            ),
            ApiKeyExpired => (
                "API_KEY_EXPIRED",
                401,
                "The API key has expired.",
                "La API key ha expirado.",
            ),
            ApiKeyNoUser => (
                "API_KEY_NO_USER",
                401,
                "The API key is valid but no user could be resolved for it.",
                "La API key es válida pero no se pudo resolver un usuario de la empresa.",
            ),
            TokenExpired => (
                "TOKEN_EXPIRED",
                401,
                "The session token has expired.",
                "El token de sesión ha expirado.",
            ),
            InvalidToken => (
                "INVALID_TOKEN",
                401,
                "The session token is invalid.",
                "El token de sesión no es válido.",
            ),
            SessionExpired => (
                "SESSION_EXPIRED",
                401,
                "The session has expired.",
                "La sesión ha expirado.",
            ),
            Forbidden => (
                "FORBIDDEN",
                403,
                "The API key does not have permission for the requested resource.",
                "La API key no tiene permiso para el recurso solicitado.",
            ),
            TenantForbidden => (
                "TENANT_FORBIDDEN",
                403,
                "The requested tenant is outside the API key's scope.",
                "La empresa u organización solicitada está fuera del alcance de la API key.",
            ),
            OriginNotAllowed => (
                "ORIGIN_NOT_ALLOWED",
                403,
                "The request origin is not allowed for this API key.",
                "El origen de la solicitud no está permitido para esta API key.",
            ),
            WebSessionRequired => (
                "WEB_SESSION_REQUIRED",
                403,
                "This route requires a web session; API keys are not accepted.",
                "Esta ruta requiere una sesión web; no se aceptan API keys.",
            ),
            ApiKeyManagementForbidden => (
                "API_KEY_MANAGEMENT_FORBIDDEN",
                403,
                "API keys cannot manage API keys. Use the web app.",
                "La gestión de API keys no está disponible con una API key. Use la aplicación web.",
            ),
            ApiKeyDeleteForbidden => (
                "API_KEY_DELETE_FORBIDDEN",
                403,
                "API keys cannot perform DELETE requests. Use the web app.",
                "Las API keys no pueden realizar solicitudes DELETE. Use la aplicación web.",
            ),
            BudgetExhausted => (
                "BUDGET_EXHAUSTED",
                402,
                "The API key's monthly budget is exhausted.",
                "El presupuesto mensual de la API key se agotó.",
            ),
            RateLimitExceeded => (
                "RATE_LIMIT_EXCEEDED",
                429,
                "Too many requests with this API key. Try again later.",
                "Demasiadas solicitudes con la misma API key. Intente de nuevo más tarde.",
            ),
            KeysetUnavailable => (
                "KEYSET_UNAVAILABLE",
                503,
                "API keys cannot be verified right now.",
                "No es posible verificar las API keys en este momento.",
            ),
            AmbiguousPath => (
                "AMBIGUOUS_PATH",
                400,
                "The request path holds a dot segment or an encoded slash; send the resolved path.",
                "La ruta de la solicitud contiene un segmento de puntos o una barra codificada; envíe la ruta resuelta.",
            ),
        }
    }
}

/// A refusal is the request domain's error: `Err(code)` from every check on the request path.
impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ErrorCode {}

/// The HTTP reason phrase, used as the body in plain-text mode (Compago answers `Unauthorized`).
pub fn reason_phrase(status: u32) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_code_has_its_denied_counter_in_lower_case() {
        assert_eq!(
            ErrorCode::InvalidApiKey.denied_counter(),
            "denied.invalid_api_key"
        );
        assert_eq!(
            ErrorCode::ApiKeyChecksumMismatch.denied_counter(),
            "denied.api_key_checksum_mismatch"
        );
    }

    #[test]
    fn docs_error_codes_lists_every_code_with_its_status_and_nothing_else() {
        let doc = include_str!("../../docs/error-codes.md");
        let rows: Vec<(&str, &str)> = doc
            .lines()
            .filter_map(|line| {
                let mut cells = line.strip_prefix("| `")?.split(" | ");
                let code = cells.next()?.strip_suffix('`')?;
                Some((code, cells.next()?))
            })
            .filter(|(code, _)| code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
            .collect();
        for code in ErrorCode::ALL {
            let status = code.status().to_string();
            assert!(
                rows.contains(&(code.as_str(), status.as_str())),
                "docs/error-codes.md has no row `{}` | {status}",
                code.as_str()
            );
        }
        for (name, _) in &rows {
            assert!(
                ErrorCode::from_name(name).is_some(),
                "docs/error-codes.md lists {name}, which is not a code"
            );
        }
    }

    #[test]
    fn every_code_round_trips_through_its_name() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
    }

    #[test]
    fn statuses_match_the_documented_families() {
        assert_eq!(ErrorCode::TokenMissing.status(), 401);
        assert_eq!(ErrorCode::ApiKeyDeleteForbidden.status(), 403);
        assert_eq!(ErrorCode::BudgetExhausted.status(), 402);
        assert_eq!(ErrorCode::RateLimitExceeded.status(), 429);
        assert_eq!(ErrorCode::KeysetUnavailable.status(), 503);
        assert_eq!(ErrorCode::AmbiguousPath.status(), 400);
    }

    #[test]
    fn a_code_displays_as_its_name_and_is_a_std_error() {
        let err: Box<dyn std::error::Error> = Box::new(ErrorCode::TenantForbidden);
        assert_eq!(err.to_string(), "TENANT_FORBIDDEN");
    }
}
