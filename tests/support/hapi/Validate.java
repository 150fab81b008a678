// Validates FHIR R4 JSON files with the HAPI FHIR instance validator, offline: the base
// specification's profiles and value sets, no terminology server (LOINC and SNOMED CT
// codes cannot be checked without one; HAPI reports them as warnings or information).
// Usage: java -cp 'libs/*:classes' Validate FILE...  -> one JSON object per message on stdout:
// {"file": ..., "severity": ..., "location": ..., "id": ..., "message": ...}
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;

public final class Validate {
    private static String q(String s) {
        if (s == null) return "null";
        StringBuilder b = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            switch (c) {
                case '"': b.append("\\\""); break;
                case '\\': b.append("\\\\"); break;
                case '\n': b.append("\\n"); break;
                case '\r': b.append("\\r"); break;
                case '\t': b.append("\\t"); break;
                default:
                    if (c < 0x20) b.append(String.format("\\u%04x", (int) c)); else b.append(c);
            }
        }
        return b.append('"').toString();
    }

    public static void main(String[] args) throws Exception {
        FhirContext ctx = FhirContext.forR4();
        ValidationSupportChain chain = new ValidationSupportChain(
                new DefaultProfileValidationSupport(ctx),
                new InMemoryTerminologyServerValidationSupport(ctx),
                new CommonCodeSystemsTerminologyService(ctx),
                new SnapshotGeneratingValidationSupport(ctx));
        FhirInstanceValidator module = new FhirInstanceValidator(chain);
        FhirValidator validator = ctx.newValidator().registerValidatorModule(module);
        for (String file : args) {
            String text = Files.readString(Path.of(file), StandardCharsets.UTF_8);
            ValidationResult result = validator.validateWithResult(text);
            for (SingleValidationMessage m : result.getMessages()) {
                System.out.println("{\"file\": " + q(file)
                        + ", \"severity\": " + q(m.getSeverity().getCode())
                        + ", \"location\": " + q(m.getLocationString())
                        + ", \"id\": " + q(m.getMessageId())
                        + ", \"message\": " + q(m.getMessage()) + "}");
            }
        }
    }
}
